"""ShapesWorld scoring: claim checking against the facts, CHAIR over scenes, the runner, the blind baseline."""

import json
import random

import pytest

from factrl.trainers import metrics as M
from factrl.trainers.shapesworld import dataset as SD
from factrl.trainers.shapesworld import grammar as G
from factrl.trainers.shapesworld import scenes as W
from factrl.trainers.shapesworld import scoring as R
from factrl.trainers.shapesworld import specs as SP

SCENE = W.Scene(
    "t",
    "t.png",
    "gray",
    [
        W.Obj("circle", "red", "large", 0, 0),
        W.Obj("star", "blue", "small", 1, 1),
        W.Obj("circle", "green", "small", 2, 2),
    ],
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    SD.write_dataset(root, 80, seed=2, n_eval=40)
    return root


@pytest.mark.parametrize(
    "text,claims,truth",
    [
        ("The circle is red.", [("color_of", "circle", "red")], [True]),
        ("The star is red.", [("color_of", "star", "red")], [False]),
        ("The red circle is large.", [("size", "red", "circle", "large")], [True]),
        ("The blue star is large.", [("size", "blue", "star", "large")], [False]),
        ("The blue star is at the center.", [("at", "blue", "star", "center")], [True]),
        ("The green circle is at the top right.", [("at", "green", "circle", "top right")], [False]),
        ("There are 3 shapes.", [("count", None, None, 3)], [True]),
        ("There are 2 circles.", [("count", None, "circle", 2)], [True]),
        ("There is 1 red shape.", [("count", "red", None, 1)], [True]),
        ("There are 0 crosses.", [("count", None, "cross", 0)], [True]),
        ("There are 2 stars.", [("count", None, "star", 2)], [False]),
        ("There is no square in the image.", [("count", None, "square", 0)], [True]),
        ("There is no blue star in the image.", [("count", "blue", "star", 0)], [False]),
        ("There is nothing at the top.", [("empty", "top")], [True]),
        ("There is nothing at the top left.", [("empty", "top left")], [False]),
        ("There is a small blue star at the center.", [("obj", "small", "blue", "star", "center")], [True]),
        ("There is a large blue star at the center.", [("obj", "large", "blue", "star", "center")], [False]),
        ("The background is gray.", [("background", "gray")], [True]),
        (
            "The red circle is larger than the blue star.",
            [("larger", ("red", "circle"), ("blue", "star"))],
            [True],
        ),
        (
            "The blue star is larger than the red circle.",
            [("larger", ("blue", "star"), ("red", "circle"))],
            [False],
        ),
        (
            "The blue star and the green circle are the same size.",
            [("same_size", ("blue", "star"), ("green", "circle"))],
            [True],
        ),
        (
            "A gray background with 3 shapes: large red circle at the top left, "
            "small purple cross at the bottom.",
            [
                ("background", "gray"),
                ("count", None, None, 3),
                ("obj", "large", "red", "circle", "top left"),
                ("obj", "small", "purple", "cross", "bottom"),
            ],
            [True, True, True, False],
        ),
        ("I am not sure.", [], []),
    ],
)
def test_extract_and_check_claims(text, claims, truth):
    got = G.extract_claims(text)
    assert got == claims
    assert [G.check_claim(c, SCENE) for c in got] == truth


def test_check_answer_open_yesno_choice():
    spec = {"type": "color", "shape": "star"}
    assert G.check_answer("The star is blue.", spec, SCENE) == {
        "correct": True,
        "hallucination": False,
        "n_claims": 1,
        "false_claims": [],
    }
    r = G.check_answer("The star is red.", spec, SCENE)
    assert not r["correct"] and r["hallucination"] and r["false_claims"] == [("color_of", "star", "red")]
    r = G.check_answer("I cannot tell.", spec, SCENE)
    assert not r["correct"] and not r["hallucination"]
    ex = {"type": "exists", "color": "red", "shape": "star"}
    assert G.check_answer("No.", ex, SCENE)["correct"]
    assert G.check_answer("Yes, there is.", ex, SCENE)["hallucination"]
    ch = {
        "type": "choice",
        "about": "color",
        "shape": "star",
        "options": ["red", "blue", "green", "yellow"],
        "answer": "B",
    }
    assert G.check_answer("B", ch, SCENE)["correct"]
    assert G.check_answer("C", ch, SCENE)["hallucination"]
    r = G.check_answer("I do not know.", ch, SCENE)
    assert not r["correct"] and not r["hallucination"]


def test_chair_hand_worked():
    other = W.Scene("u", "u.png", "white", [W.Obj("square", "yellow", "large", 0, 0)])
    res = R.chair(
        [
            "A red circle and a blue star and a red star. The red circle again.",  # 3 mentions, 1 bad
            "A yellow square.",  # 1 mention, fine
            "Purple crosses everywhere.",
        ],  # plural, 1 bad
        [SCENE, other, other],
    )
    assert res["n_mentions"] == 5
    assert res["chair_i"] == pytest.approx(2 / 5) and res["chair_s"] == pytest.approx(2 / 3)
    assert res["coverage"] == pytest.approx(3 / 5)  # 2 of 3 in SCENE, 1 of 1, 0 of 1


def _oracle(scenes):
    """Answers computed from the facts (spec + scene), not read from the eval files."""
    return lambda items: [G.answer(it["spec"], scenes[it["image"]]) for it in items]


def test_oracle_scores_perfectly(data_root):
    scenes = SD.load_scenes(data_root / "scenes.json")
    calls = []
    gen = _oracle(scenes)

    def fn(items):
        calls.append(items)
        assert all("answer" not in it and "label" not in it for it in items)  # no answers leak
        return gen(items)

    res = R.run_eval(fn, data_root, progress=False, batch_size=7)
    assert max(len(c) for c in calls) <= 7
    assert res["hallucination_rate"] == 0.0 and res["mmhal"]["score"] == 1.0
    assert set(res["mmhal"]["per_category"]) == set(SP.CATEGORIES)
    for split in ("random", "popular", "adversarial"):
        p = res["pope"][split]
        assert p["f1"] == 1.0 and p["accuracy"] == 1.0 and p["yes_ratio"] == 0.5
    assert (
        res["chair"]["chair_i"] == 0.0 and res["chair"]["chair_s"] == 0.0 and res["chair"]["coverage"] == 1.0
    )


def test_always_yes_gets_the_expected_pope_numbers(data_root):
    res = R.run_eval(lambda items: ["Yes."] * len(items), data_root, progress=False)
    for split in ("random", "popular", "adversarial"):
        items = json.loads((data_root / "eval" / f"pope_{split}.json").read_text())
        share = sum(it["label"] == "yes" for it in items) / len(items)
        p = res["pope"][split]
        assert p["accuracy"] == pytest.approx(share) and p["precision"] == pytest.approx(share)
        assert p["recall"] == 1.0 and p["yes_ratio"] == 1.0
    assert res["chair"]["n_mentions"] == 0 and res["chair"]["coverage"] == 0.0


def test_hallucinating_answerer_is_caught(data_root):
    scenes = SD.load_scenes(data_root / "scenes.json")
    rng = random.Random(0)
    res = R.run_eval(
        lambda items: [G.hallucinate(it["spec"], scenes[it["image"]], rng)[0] for it in items],
        data_root,
        progress=False,
    )
    assert res["hallucination_rate"] == 1.0 and res["mmhal"]["score"] == 0.0
    for split in ("random", "popular", "adversarial"):
        assert res["pope"][split]["accuracy"] == 0.0  # every yes/no flipped
    assert res["chair"]["chair_s"] > 0.25 and res["chair"]["chair_i"] > 0  # wrong attribute / absent object


def test_max_items_out_path_and_table(data_root, tmp_path, capsys):
    scenes = SD.load_scenes(data_root / "scenes.json")
    res = R.run_eval(_oracle(scenes), data_root, max_items=5, progress=True, out_path=tmp_path / "r.json")
    assert res["pope"]["random"]["n"] == 5 and res["mmhal"]["n"] == 5 and res["chair"]["n"] == 5
    assert json.loads((tmp_path / "r.json").read_text())["mmhal"]["n"] == 5
    assert "POPE F1 random" in capsys.readouterr().err
    yes = R.run_eval(lambda items: ["Yes."] * len(items), data_root, max_items=5, progress=False)
    yes["rm"] = M.rm_accuracy([(1, 0, True), (0, 1, False)])
    t = M.format_table({"oracle": res, "always-yes": yes})
    lines = t.splitlines()
    assert "oracle" in lines[0] and "always-yes" in lines[0]
    row = next(line for line in lines if line.startswith("POPE F1 random"))
    assert row.split()[-2:] == ["1.000", f"{yes['pope']['random']['f1']:.3f}"]
    rm = next(line for line in lines if line.startswith("RM accuracy ↑"))
    assert rm.split()[-2:] == ["-", "0.500"]
    for label in ("hallucination rate", "CHAIR_i", "CHAIR_s", "MMHal score", "POPE F1 adversarial"):
        assert any(line.startswith(label) for line in lines)


def test_generate_fn_must_return_one_answer_per_item(data_root):
    with pytest.raises(ValueError, match="responses"):
        R.run_eval(lambda items: ["Yes."], data_root, max_items=3, progress=False, batch_size=4)


def test_blind_answers_is_the_majority_answer_per_question():
    def rec(image, *turns):
        return {"image": image, "conversations": [
            {"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]}

    red, bg = "Is there a red circle in the image?", "What color is the background?"
    recs = [rec("a.png", (f"<image>\n{red}", "No."), (bg, "The background is white.")),
            rec("b.png", (f"{red}\n<image>", "Yes.")),
            rec("c.png", (f"<image>\n{red}", "Yes."), (bg, "The background is gray."), (bg, "The background is gray.")),
            {"conversations": [{"from": "human", "value": "What shapes can appear?"},
                               {"from": "gpt", "value": "Circles."}]}]
    blind = R.blind_answers(recs)
    items = [{"image": "z.png", "question": q} for q in
             ("Is there a red circle in the image?", "What color is the background?", "Is there a blue star?")]
    # the <image> token's place does not matter; unseen questions get no answer
    assert blind(items) == ["Yes.", "The background is gray.", ""]


def test_run_eval_on_chosen_sets_and_the_mmhal_answer_length(data_root):
    asked = []

    def fn(items):
        asked.extend(items)
        return ["No, two three." for _ in items]

    res = R.run_eval(fn, data_root, max_items=6, progress=False, only=("mmhal", "pope_adversarial"))
    assert set(res["pope"]) == {"adversarial"} and "chair" not in res and res["mmhal"]["n"] == 6
    assert len(asked) == 12  # the other sets' questions are never generated
    assert res["mmhal"]["response_words"] == 3.0
    with pytest.raises(ValueError, match="unknown eval sets"):
        R.run_eval(fn, data_root, only=("mmhal", "pope_typo"), progress=False)


def test_checker_reward_hand_worked(data_root, tmp_path):
    """+1 for the faithful answer, -1 for a planted lie, ``vague`` for an answer that claims nothing;
    a PPO record without its spec is refused naming the file, the record and the field."""
    from types import SimpleNamespace

    from factrl.trainers.data import DataError

    recs = json.loads((data_root / "ppo_prompts.json").read_text())
    scenes = SD.load_scenes(data_root / "scenes.json")
    fn = R.checker_reward(data_root, "ppo_prompts.json", vague=-0.25)
    rng = random.Random(0)
    for rec in recs[:30]:
        scene, spec = scenes[rec["image"]], rec["spec"]
        lie, _ = G.hallucinate(spec, scene, rng)
        got = fn([SimpleNamespace(id=rec["id"])] * 3, [G.answer(spec, scene), lie, "."]).tolist()
        # "." claims nothing: vague, except to a yes/no question, where it reads as "yes" (POPE's rule,
        # metrics.parse_yes_no: anything without a "no" is a yes)
        dot = (1.0 if G.answer(spec, scene) == "Yes." else -1.0) if G.qtype(spec).yesno else -0.25
        assert got == [1.0, -1.0, dot], (spec, lie)
    bad = tmp_path / "d"
    bad.mkdir()
    (bad / "scenes.json").write_text((data_root / "scenes.json").read_text())
    del recs[3]["spec"]
    (bad / "ppo_prompts.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"ppo_prompts.json.*3.*spec"):
        R.checker_reward(bad, "ppo_prompts.json", vague=-0.5)
