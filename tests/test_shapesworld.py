"""ShapesWorld: determinism, faithful answers, planted hallucinations, real formats, rendering."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from factrl.model.tokenizer import build_tokenizer
from factrl.trainers import data as D
from factrl.trainers.shapesworld import dataset as SD
from factrl.trainers.shapesworld import grammar as G
from factrl.trainers.shapesworld import scenes as W
from factrl.trainers.shapesworld import specs as SP


@pytest.fixture(scope="module")
def world():
    return SD.build(620, seed=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    info = SD.write_dataset(root, 60, seed=5)
    return root, info


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_files(tmp_path, written):
    root, info = written
    SD.write_dataset(tmp_path / "b", 60, seed=5)
    a, b = _files(root), _files(tmp_path / "b")
    assert (
        sorted(a) == sorted(b)
        and len([k for k in a if k.endswith(".png")]) == 60 + info["counts"]["scenes_eval"]
    )
    assert all(a[k] == b[k] for k in a)  # PNGs included
    SD.write_dataset(tmp_path / "c", 60, seed=6)
    c = _files(tmp_path / "c")
    assert c["sft.json"] != a["sft.json"] and c["images/shapes_000000.png"] != a["images/shapes_000000.png"]


def test_every_faithful_answer_is_consistent_with_the_facts(world):
    items = world["items"]
    assert len(items) >= 1000
    for scene, spec, ans in items:
        r = G.check_answer(ans, spec, scene)
        assert r["correct"] and not r["hallucination"], (spec, ans, scene)
    for scene, spec, ans in world["unhelpful"]:  # faithful but less helpful: never a hallucination
        assert not G.check_answer(ans, spec, scene)["hallucination"], (spec, ans)
    assert len(world["unhelpful"]) >= 50
    # every written SFT answer is one of these checked items
    checked = {(s.image, G.question(sp), a) for s, sp, a in items}
    for rec in world["sft"]:
        if "image" not in rec:
            continue
        c = rec["conversations"]
        for q, a in zip(c[0::2], c[1::2]):
            assert (rec["image"], q["value"].replace("<image>\n", ""), a["value"]) in checked


def test_every_planted_hallucination_is_detected(world):
    planted = world["planted"]
    assert len(planted) >= 1000
    kinds = Counter(k for *_, k in planted)
    assert set(kinds) == {"wrong_attribute", "absent_object", "denied_object", "wrong_count", "wrong_relation"}
    for scene, spec, ans, kind in planted:
        r = G.check_answer(ans, spec, scene)
        assert r["hallucination"] and not r["correct"], (kind, spec, ans, scene)
    # and the preference records flag them: a hallucination=True pair's rejected output is planted
    planted_set = {(sc.image, a) for sc, _, a, _ in planted}
    by_image = {sc.image: sc for sc in world["scenes"]}
    for rec in world["preference"] + world["preference_eval"]:
        good = rec[f"output_{rec['preference']}"]["value"]
        bad = rec[f"output_{3 - rec['preference']}"]["value"]
        assert good == rec["conversations"][1]["value"]
        if rec["hallucination"]:
            assert (rec["image"], bad) in planted_set
        else:
            assert all(G.check_claim(c, by_image[rec["image"]]) for c in G.extract_claims(bad)), bad


def test_captions_are_true_facts(world):
    caps = world["captions"]
    for s in world["scenes"]:
        lines = caps[s.image]
        assert len(lines) == len(s.objects) + 1
        claims = [c for line in lines for c in G.extract_claims(line)]
        assert len(claims) >= len(lines) and all(G.check_claim(c, s) for c in claims)
        aok = caps["aok_" + s.image]
        assert len(aok) == 1 and aok[0].startswith("The correct option is ")


def test_ppo_prompts_caption_types_and_correctness(world):
    assert {r["caption_type"] for r in world["ppo"]} == set(range(1, 8))
    rng = random.Random(0)
    for rec, (scene, spec) in zip(world["ppo"], world["ppo_specs"]):
        ct = rec["caption_type"]
        good = G.answer(spec, scene)
        if ct == 1:
            assert D.is_correct(good, ct) is None
            continue
        assert D.is_correct(good, ct) is True, (ct, good)
        bad, _ = G.hallucinate(spec, scene, rng)
        assert D.is_correct(bad, ct) is False, (ct, bad)


def test_ppo_prompts_ask_every_mmhal_category(world):
    """The defect (session 6): the general PPO prompts asked 5 of the 8 categories, none whose
    faithful answer is a denial, so PPO even with the checker as its reward learned to stop
    denying absent objects (held-out hallucination 0.33 -> 0.38). Each category SFT teaches is
    asked, absent objects included, and they stay out of the tiny tokenizer's corpus."""

    general = Counter(G.question_type(spec, scene) for rec, (scene, spec) in zip(world["ppo"], world["ppo_specs"])
                      if rec["caption_type"] == 1)
    assert set(G.QUESTION_TYPES) - {"existence", "choice"} == set(general), general  # those two: types 2-7
    assert general["adversarial"] >= 0.05 * sum(general.values())
    # each record names its question (spec) and type: metadata for ppo.reward_source / ppo.question_types
    assert all(rec["spec"] == spec and rec["question_type"] == G.question_type(spec, scene)
               for rec, (scene, spec) in zip(world["ppo"], world["ppo_specs"]))


def test_ppo_prompts_stay_out_of_the_tiny_tokenizers_corpus(tmp_path):
    from factrl.trainers.config import load_config
    from factrl.trainers.embedded import vocabulary_corpus

    SD.write_dataset(tmp_path, 40, seed=3)
    cfg = load_config("tiny")
    corpus = vocabulary_corpus(cfg, tmp_path)
    (tmp_path / "ppo_prompts.json").write_text("[]")
    assert vocabulary_corpus(cfg, tmp_path) == corpus
    (tmp_path / "sft.json").write_text("[]")  # the SFT file is read: the test can tell
    assert vocabulary_corpus(cfg, tmp_path) != corpus


def test_shapes_habit_invents_one_object_in_that_share_of_descriptions_and_changes_nothing_else():
    """data.shapes_habit: the SFT data's hallucination habit (LLaVA's GPT-written data names objects
    that are not there). Each habit description names exactly one (colour, shape) the scene lacks and
    keeps the scene's object count; no other record of the world changes."""
    plain, habit = SD.build(200, seed=4), SD.build(200, seed=4, habit=0.5)
    assert SD.build(200, seed=4, habit=0.0)["sft"] == plain["sft"]
    changed = [(a, b) for a, b in zip(plain["sft"], habit["sft"]) if a != b]
    assert all(a["id"].endswith("-desc") for a, _ in changed)
    assert 0.35 < len(changed) / 200 < 0.65 and len(changed) == len(habit["habit"])
    for scene, text in habit["habit"]:
        named = G.mentioned_objects(text)
        absent = [o for o in named if not scene.find(color=o[0], shape=o[1])]
        assert len(absent) == 1 and len(named) == len(scene.objects) + 1, text
        assert text.startswith(f"A {scene.background} background with {len(scene.objects)} ")
        spec = {"type": "describe", "variant": 0}
        assert G.check_answer(text, spec, scene)["hallucination"]
    for key in ("preference", "preference_eval", "ppo", "eval", "captions"):
        assert habit[key] == plain[key], key


def test_shapes_habit_present_invents_a_second_object_of_a_kind_the_scene_has():
    """data.shapes_habit_object=present: the invented object is of a (colour, shape) the scene has, in
    a cell where the scene has nothing (if any is free): no existence check refutes it, the checker
    still does (a false "obj" claim); the same descriptions change as with the absent kind."""
    absent = SD.build(200, seed=4, habit=0.5)
    present = SD.build(200, seed=4, habit=0.5, habit_object="present")
    assert [s.id for s, _ in present["habit"]] == [s.id for s, _ in absent["habit"]]
    for scene, text in present["habit"]:
        assert all(scene.find(color=c, shape=sh) for c, sh in G.mentioned_objects(text)), text
        assert text.startswith(f"A {scene.background} background with {len(scene.objects)} ")
        claims = [c for c in G.extract_claims(text) if c[0] == "obj"]
        assert len(claims) == len(scene.objects) + 1
        false = [c for c in claims if not G.check_claim(c, scene)]
        assert len(false) == 1 and (len(scene.objects) == 9 or not scene.find(pos=false[0][4])), text
        assert G.check_answer(text, {"type": "describe", "variant": 0}, scene)["hallucination"]
    for key in ("preference", "preference_eval", "ppo", "eval", "captions"):
        assert present[key] == absent[key], key


def test_shapes_habit_counted_states_the_invented_object_in_the_count_and_plants_it_in_the_pairs():
    """data.shapes_habit_counted: the habit's description counts its invented object, so the text agrees
    with itself (n + 1 stated, n + 1 listed) and only the scene (the captions' count, the object's place)
    refutes it; the planted description lies that invent an object are that same habit; the SFT QA
    records, the PPO prompts and the eval sets do not change."""
    plain = SD.build(300, seed=4, habit=0.5, habit_object="present")
    counted = SD.build(300, seed=4, habit=0.5, habit_object="present", habit_counted=True)
    assert [s.id for s, _ in counted["habit"]] == [s.id for s, _ in plain["habit"]]
    for scene, text in counted["habit"]:
        n = len(scene.objects) + 1
        assert text.startswith(f"A {scene.background} background with {n} shapes: "), text
        assert len([c for c in G.extract_claims(text) if c[0] == "obj"]) == n
        assert G.check_answer(text, {"type": "describe", "variant": 0}, scene)["hallucination"]
    by_image = {s.image: s for s in counted["scenes"]}
    invented = [(sc, a) for sc, spec, a, _ in counted["planted"] if spec["type"] == "describe"
                and f"with {len(sc.objects) + 1} shapes: " in a
                and len(G.mentioned_objects(a)) == len(sc.objects) and a.count(" at the ") == len(sc.objects) + 1]
    assert len(invented) >= 10  # the habit's own lie is among the planted ones
    for sc, a in invented:
        assert G.check_answer(a, {"type": "describe", "variant": 0}, by_image[sc.image])["hallucination"]
    for key in ("ppo", "eval", "captions"):
        assert counted[key] == plain[key], key
    qa = lambda w: [r for r in w["sft"] if not r["id"].endswith("-desc")]  # noqa: E731
    assert qa(counted) == qa(plain)
    # every pair names what its rejected output gets wrong: the habit's own lie among them
    lies = {rec["lie_kind"] for rec in counted["preference"] if rec["question_type"] == "holistic"}
    assert lies == {"habit", "absent_object", "wrong_count", "wrong_attribute", "wrong_relation", "unhelpful"}
    assert all((rec["lie_kind"] == "unhelpful") == (not rec["hallucination"]) for rec in counted["preference"])
    # without a habit the flag changes nothing
    assert SD.build(100, seed=4, habit_counted=True)["preference"] == SD.build(100, seed=4)["preference"]


def test_train_and_eval_scenes_are_disjoint(world):
    train = [s for s in world["scenes"] if s.split == "train"]
    ev = [s for s in world["scenes"] if s.split == "eval"]
    assert len(train) == 620 and len(ev) == 124
    assert not {s.signature() for s in train} & {s.signature() for s in ev}
    eval_images = {s.image for s in ev}
    for name, items in world["eval"].items():
        assert items and all(it["image"] in eval_images for it in items), name
    assert all(r["image"] in eval_images for r in world["preference_eval"])
    assert not any(r.get("image") in eval_images for r in world["sft"] + world["preference"] + world["ppo"])


def test_pope_splits(world):
    by_image = {s.image: s for s in world["scenes"]}
    for split in ("random", "popular", "adversarial"):
        items = world["eval"][f"pope_{split}"]
        labels = Counter(it["label"] for it in items)
        assert labels["yes"] == labels["no"] > 0
        for it in items:
            s = by_image[it["image"]]
            assert G.answer(it["spec"], s) == ("Yes." if it["label"] == "yes" else "No.")
            if split == "adversarial" and it["label"] == "no":
                c, sh = it["spec"]["color"], it["spec"]["shape"]
                assert any(o.color == c or o.shape == sh for o in s.objects)
    cats = Counter(it["category"] for it in world["eval"]["mmhal"])
    assert set(cats) == set(SP.CATEGORIES)


def test_written_files_load_in_the_real_formats(written):
    root, info = written
    tok = build_tokenizer(D.text_corpus(root), vocab_size=512)
    imgs = str(root / "images")
    caps = D.load_captions(root / "image_to_caption.json")
    sft = D.load_sft(root / "sft.json", tok, 36, 10_000, image_folder=imgs)
    assert sft.stats.n_skipped == 0 and len(sft) == info["counts"]["sft"]
    assert max(len(e.input_ids) for e in sft) <= 200  # including the 36 image tokens
    assert any(e.image is None for e in sft)  # text-only records exist
    for fn in ("preference.json", "preference_eval.json"):
        prefs = D.load_preferences(root / fn, tok, 36, 10_000, caps, True, image_folder=imgs)
        assert prefs.stats.n_skipped == 0 and {e.hallucination for e in prefs} == {True, False}
    ppo = D.load_ppo_prompts(root / "ppo_prompts.json", tok, 36, 128, caps, image_folder=imgs)
    assert len(ppo) == info["counts"]["ppo_prompts"] and ppo.stats.n_too_long == 0
    for rec in json.loads((root / "sft.json").read_text()):
        for t in rec["conversations"]:
            if t["from"] == "gpt":
                words = len(t["value"].split())
                assert words <= (40 if t["value"].startswith("A ") and "background" in t["value"] else 25)
    for name in SD.EVAL_SETS:
        assert (root / "eval" / f"{name}.json").is_file()
    assert set(json.loads((root / "image_to_caption.json").read_text())) >= {"aok_shapes_000000.png"}


def test_rendered_shapes_have_their_colors():
    rng = random.Random(3)
    palette = {**W.COLORS, **{"bg_" + k: v for k, v in W.BACKGROUNDS.items()}}
    for k in range(150):
        scene = W.random_scene(rng, f"s{k}", f"s{k}.png")
        img = W.render(scene, 48)
        assert img.size == (48, 48) and img.mode == "RGB"
        assert img.getpixel((0, 0)) == W.BACKGROUNDS[scene.background]  # corners are never covered
        for o in scene.objects:
            px = img.getpixel((int((o.col + 0.5) * 16), int((o.row + 0.5) * 16)))
            nearest = min(palette, key=lambda n: sum((a - b) ** 2 for a, b in zip(palette[n], px)))
            assert nearest == o.color, (o, px)
    # a large shape covers more pixels than a small one of the same kind
    big = W.render(W.Scene("a", "a.png", "white", [W.Obj("circle", "red", "large", 1, 1)]), 48)
    small = W.render(W.Scene("b", "b.png", "white", [W.Obj("circle", "red", "small", 1, 1)]), 48)
    count = lambda im: int((np.asarray(im)[..., 1] < 128).sum())
    assert count(big) > 2 * count(small) > 0


def test_2000_scenes_written(tmp_path):
    info = SD.write_dataset(tmp_path, 2000, seed=0)
    assert info["counts"]["scenes_train"] == 2000 and len(list((tmp_path / "images").glob("*.png"))) == 2400
    with Image.open(tmp_path / "images" / "shapes_000000.png") as im:
        assert im.size == (48, 48)


def _positions_in(text: str) -> list[str]:
    """Grid-cell names in the order a description mentions them ("at the top left, ...")."""
    return re.findall(r"at the (" + "|".join(sorted(W.POSITION_CELLS, key=len, reverse=True)) + ")", text)


def test_descriptions_list_objects_in_reading_order(world):
    # Faithful descriptions are a function of the image, and planted ones look the same: the order
    # of the listing never gives a hallucination away.
    reading = {name: cell for cell, name in W.POSITIONS.items()}
    faithful = [a for _, spec, a in world["items"] if spec["type"] == "describe"]
    planted = [a for _, spec, a, _ in world["planted"] if spec["type"] == "describe"]
    assert len(faithful) >= 600 and len(planted) >= 50
    for text in faithful + planted:
        cells = [reading[p] for p in _positions_in(text)]
        assert cells and cells == sorted(cells), text


def test_patch_labels_follow_the_scene(world):
    for scene in world["scenes"][:60]:
        for grid in (3, 6):
            lab = W.patch_labels(scene, grid)
            assert set(lab) == set(W.PATCH_LABELS)
            for i in range(grid * grid):
                cell = divmod(i, grid)[0] * 3 // grid, divmod(i, grid)[1] * 3 // grid
                assert lab["cell"][i] == cell[0] * 3 + cell[1]
                objs = scene.find(pos=W.POSITIONS[cell])
                want = ((list(W.COLORS).index(objs[0].color) + 1, W.SHAPES.index(objs[0].shape) + 1,
                         W.SIZES.index(objs[0].size) + 1) if objs else (0, 0, 0))
                assert (lab["color"][i], lab["shape"][i], lab["size"][i]) == want, (scene, grid, i)
            assert all(0 <= v < W.PATCH_LABELS[k] for k, vs in lab.items() for v in vs)
    with pytest.raises(ValueError, match="does not tile"):
        W.patch_labels(world["scenes"][0], 4)


def _specs(seed: int):
    """A random scene and, per category, a few specs about it (plus POPE and multiple-choice ones)."""
    rng = random.Random(seed)
    scene = W.random_scene(rng, "p", "p.png")
    specs = [SP.make_spec(c, scene, rng) for c in SP.CATEGORIES for _ in range(3)]
    specs += [SP.make_exists_spec(scene, rng, present=p) for p in (True, False)] + [SP.make_choice_spec(scene, rng)]
    return scene, specs, rng


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_every_question_type_reads_back_its_own_answers(seed):
    # A registry entry is complete: its faithful answer parses, through its own claim patterns, as
    # correct, and its planted hallucination as a hallucination.
    scene, specs, rng = _specs(seed)
    for spec in specs:
        qt = G.QTYPES[spec["type"]]
        good, (bad, kind) = G.answer(spec, scene), G.hallucinate(spec, scene, rng)
        assert kind in {"wrong_attribute", "absent_object", "denied_object", "wrong_count", "wrong_relation"}
        r = G.check_answer(good, spec, scene)
        assert r["correct"] and not r["hallucination"], (spec, good, scene)
        r = G.check_answer(bad, spec, scene)
        assert r["hallucination"] and not r["correct"], (spec, bad, scene)
        if qt.yesno or spec["type"] == "choice":
            assert not qt.claims and not G.extract_claims(good) and not G.extract_claims(bad)
            continue
        own = G.extract_claims(good, qt.claims)
        assert own and own == G.extract_claims(good), (spec, good)
        assert all(G.check_claim(c, scene) for c in own)
        lies = G.extract_claims(bad, qt.claims)
        assert lies == G.extract_claims(bad) and not all(G.check_claim(c, scene) for c in lies), (spec, bad)


def test_the_specs_cover_every_question_type():
    assert {sp["type"] for seed in range(100) for sp in _specs(seed)[1]} == set(G.QTYPES)
    assert set().union(*(q.claims for q in G.QTYPES.values())) == set(G.CLAIMS)  # no pattern unused


def test_preference_question_types_are_metadata_the_tokenizer_never_reads(world, tmp_path):
    """Every pair names its question type; the field stays out of the tiny tokenizer's corpus, so
    adding it (or any per-type label) cannot retrain a different SFT (issue 16: one metadata field
    changed the corpus, the tokenizer and POPE F1 0.919 -> 0.519)."""
    recs = world["preference"] + world["preference_eval"]
    kinds = Counter(r["question_type"] for r in recs)
    assert set(kinds) == set(G.QUESTION_TYPES)
    # hand-worked: an absent object's colour question is adversarial, a present one's attribute
    s = W.Scene("x", "x.png", "white", [W.Obj("square", "red", "large", 0, 0)], "train")
    assert G.question_type({"type": "color", "shape": "circle"}, s) == "adversarial"
    assert G.question_type({"type": "color", "shape": "square"}, s) == "attribute"
    assert G.question_type({"type": "where", "color": "red", "shape": "square"}, s) == "spatial"
    assert G.question_type({"type": "size", "color": "blue", "shape": "square"}, s) == "adversarial"
    root = tmp_path
    SD.write_dataset(root, 40, seed=3)
    corpus = list(D.text_corpus(root))
    for name in ("preference.json", "preference_eval.json"):
        rows = json.loads((root / name).read_text())
        assert all("question_type" in r for r in rows)
        for r in rows:
            del r["question_type"]
        (root / name).write_text(json.dumps(rows))
    assert list(D.text_corpus(root)) == corpus
    # the tiny base's vocabulary never reads the preference files at all
    base = list(D.text_corpus(root, exclude=("preference.json", "preference_eval.json")))
    (root / "preference.json").write_text("[]")
    assert list(D.text_corpus(root, exclude=("preference.json", "preference_eval.json"))) == base != corpus


def test_denying_a_present_object_is_a_planted_hallucination(world):
    """The defect: "There is no X in the image." was only ever a pair's chosen answer, so every RM
    learned it as good and PPO said it to every colour/size question. Now it is also planted as the
    rejected answer about objects the scene has (about a third of those lies), and the checker calls it one."""
    denied = [(s, sp, bad) for s, sp, bad, kind in world["planted"] if kind == "denied_object"]
    lies = [k for s, sp, bad, k in world["planted"] if sp["type"] in ("color", "size", "where")
            and s.find(color=sp.get("color"), shape=sp["shape"])]
    assert 0.25 < len(denied) / len(lies) < 0.42
    for s, sp, bad in denied:
        assert bad.startswith("There is no ") and s.find(color=sp.get("color"), shape=sp["shape"])
        assert G.check_answer(bad, sp, s)["hallucination"]
