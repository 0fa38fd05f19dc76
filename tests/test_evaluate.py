"""Hallucination evaluation: parsers, claim checking, POPE/CHAIR/MMHal/RM metrics, the runner."""

import json
import random

import pytest

from factrl.trainers import evaluate as E
from factrl.trainers import shapes as S

SCENE = S.Scene(
    "t",
    "t.png",
    "gray",
    [
        S.Obj("circle", "red", "large", 0, 0),
        S.Obj("star", "blue", "small", 1, 1),
        S.Obj("circle", "green", "small", 2, 2),
    ],
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    S.write_dataset(root, 80, seed=2, n_eval=40)
    return root


@pytest.mark.parametrize(
    "text,want",
    [
        ("Yes.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("Yes, there is a red circle.", "yes"),
        ("There is not a star.", "no"),
        ("No, it is not.", "no"),
        ("Yes. But no star.", "yes"),
        ("I think so", "yes"),
        ("", "yes"),
        ("NO!", "no"),
        ("Nothing here", "yes"),
    ],
)
def test_parse_yes_no_pope_rule(text, want):
    assert E.parse_yes_no(text) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) red", "C"),
        ("D red", None),
        ("D. red", "D"),
        ("A", "A"),
        ("The answer is A.", "A"),
        ("A red circle.", None),
        ("", None),
        ("b", None),
        ("Blue.", None),
    ],
)
def test_parse_choice(text, want):
    assert E.parse_choice(text) == want


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
    got = E.extract_claims(text)
    assert got == claims
    assert [E.check_claim(c, SCENE) for c in got] == truth


def test_check_answer_open_yesno_choice():
    spec = {"type": "color", "shape": "star"}
    assert E.check_answer("The star is blue.", spec, SCENE) == {
        "correct": True,
        "hallucination": False,
        "n_claims": 1,
        "false_claims": [],
    }
    r = E.check_answer("The star is red.", spec, SCENE)
    assert not r["correct"] and r["hallucination"] and r["false_claims"] == [("color_of", "star", "red")]
    r = E.check_answer("I cannot tell.", spec, SCENE)
    assert not r["correct"] and not r["hallucination"]
    ex = {"type": "exists", "color": "red", "shape": "star"}
    assert E.check_answer("No.", ex, SCENE)["correct"]
    assert E.check_answer("Yes, there is.", ex, SCENE)["hallucination"]
    ch = {
        "type": "choice",
        "about": "color",
        "shape": "star",
        "options": ["red", "blue", "green", "yellow"],
        "answer": "B",
    }
    assert E.check_answer("B", ch, SCENE)["correct"]
    assert E.check_answer("C", ch, SCENE)["hallucination"]
    r = E.check_answer("I do not know.", ch, SCENE)
    assert not r["correct"] and not r["hallucination"]


def test_pope_metrics_hand_worked():
    m = E.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6)
    none = E.pope_metrics(["no", "no"], ["yes", "no"])
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["accuracy"] == 0.5
    with pytest.raises(ValueError):
        E.pope_metrics(["maybe"], ["yes"])


def test_chair_hand_worked():
    other = S.Scene("u", "u.png", "white", [S.Obj("square", "yellow", "large", 0, 0)])
    res = E.chair(
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


def test_mmhal_and_rm_accuracy_hand_worked():
    recs = [
        {"category": "attribute", "correct": True, "hallucination": False},
        {"category": "attribute", "correct": False, "hallucination": True},
        {"category": "counting", "correct": False, "hallucination": False},
    ]
    m = E.mmhal_score(recs)
    assert m["score"] == pytest.approx(1.5 / 3) and m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["per_category"]["attribute"] == {"score": 0.5, "hallucination_rate": 0.5, "n": 2}
    assert m["per_category"]["counting"] == {"score": 0.5, "hallucination_rate": 0.0, "n": 1}
    r = E.rm_accuracy([(1.0, 0.0, True), (0.0, 1.0, True), (2.0, -1.0, False), (0.5, 0.5, None), (3, 1, -1)])
    assert r["accuracy"] == pytest.approx(3 / 5) and r["n"] == 5
    assert r["accuracy_hallucination"] == 0.5 and r["n_hallucination"] == 2
    assert r["accuracy_non_hallucination"] == 1.0 and r["n_non_hallucination"] == 1
    assert E.rm_accuracy([])["accuracy"] is None


def _oracle(scenes):
    """Answers computed from the facts (spec + scene), not read from the eval files."""
    return lambda items: [S.answer(it["spec"], scenes[it["image"]]) for it in items]


def test_oracle_scores_perfectly(data_root):
    scenes = S.load_scenes(data_root / "scenes.json")
    calls = []
    gen = _oracle(scenes)

    def fn(items):
        calls.append(items)
        assert all("answer" not in it and "label" not in it for it in items)  # no answers leak
        return gen(items)

    res = E.run_eval(fn, data_root, progress=False, batch_size=7)
    assert max(len(c) for c in calls) <= 7
    assert res["hallucination_rate"] == 0.0 and res["mmhal"]["score"] == 1.0
    assert set(res["mmhal"]["per_category"]) == set(S.CATEGORIES)
    for split in ("random", "popular", "adversarial"):
        p = res["pope"][split]
        assert p["f1"] == 1.0 and p["accuracy"] == 1.0 and p["yes_ratio"] == 0.5
    assert (
        res["chair"]["chair_i"] == 0.0 and res["chair"]["chair_s"] == 0.0 and res["chair"]["coverage"] == 1.0
    )


def test_always_yes_gets_the_expected_pope_numbers(data_root):
    res = E.run_eval(lambda items: ["Yes."] * len(items), data_root, progress=False)
    for split in ("random", "popular", "adversarial"):
        items = json.loads((data_root / "eval" / f"pope_{split}.json").read_text())
        share = sum(it["label"] == "yes" for it in items) / len(items)
        p = res["pope"][split]
        assert p["accuracy"] == pytest.approx(share) and p["precision"] == pytest.approx(share)
        assert p["recall"] == 1.0 and p["yes_ratio"] == 1.0
    assert res["chair"]["n_mentions"] == 0 and res["chair"]["coverage"] == 0.0


def test_hallucinating_answerer_is_caught(data_root):
    scenes = S.load_scenes(data_root / "scenes.json")
    rng = random.Random(0)
    res = E.run_eval(
        lambda items: [S.hallucinate(it["spec"], scenes[it["image"]], rng)[0] for it in items],
        data_root,
        progress=False,
    )
    assert res["hallucination_rate"] == 1.0 and res["mmhal"]["score"] == 0.0
    for split in ("random", "popular", "adversarial"):
        assert res["pope"][split]["accuracy"] == 0.0  # every yes/no flipped
    assert res["chair"]["chair_s"] > 0.25 and res["chair"]["chair_i"] > 0  # wrong attribute / absent object


def test_max_items_out_path_and_table(data_root, tmp_path, capsys):
    scenes = S.load_scenes(data_root / "scenes.json")
    res = E.run_eval(_oracle(scenes), data_root, max_items=5, progress=True, out_path=tmp_path / "r.json")
    assert res["pope"]["random"]["n"] == 5 and res["mmhal"]["n"] == 5 and res["chair"]["n"] == 5
    assert json.loads((tmp_path / "r.json").read_text())["mmhal"]["n"] == 5
    assert "POPE F1 random" in capsys.readouterr().err
    yes = E.run_eval(lambda items: ["Yes."] * len(items), data_root, max_items=5, progress=False)
    yes["rm"] = E.rm_accuracy([(1, 0, True), (0, 1, False)])
    t = E.format_table({"oracle": res, "always-yes": yes})
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
        E.run_eval(lambda items: ["Yes."], data_root, max_items=3, progress=False, batch_size=4)


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
    blind = E.blind_answers(recs)
    items = [{"image": "z.png", "question": q} for q in
             ("Is there a red circle in the image?", "What color is the background?", "Is there a blue star?")]
    # the <image> token's place does not matter; unseen questions get no answer
    assert blind(items) == ["Yes.", "The background is gray.", ""]
