"""The ShapesWorld dataset in exactly the LLaVA-RLHF file formats (see ``trainers/data.py``): SFT
conversations, preference pairs (faithful vs planted hallucination, or faithful vs less helpful),
``image_to_caption.json`` (with ``aok_`` keys for the multiple-choice ground truth), PPO prompts with
``caption_type``/``length_bonus``, held-out eval sets (POPE, MMHal-style, CHAIR), the scenes' facts
and PNG images. Everything is deterministic in ``seed``."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Optional

from factrl.trainers.config import write_atomic

from .grammar import answer, hallucinate, less_helpful, qtype, question, question_type, with_absent_object
from .scenes import Scene, random_scene, render
from .specs import CATEGORIES, make_choice_spec, make_exists_spec, make_spec

EVAL_SETS = ["pope_random", "pope_popular", "pope_adversarial", "mmhal", "chair"]
POPE_SPLITS = ("random", "popular", "adversarial")
# The POPE sets in POPE's format, under the data root: eval.pope.folder=<root>/eval/pope,
# eval.pope.file_pattern=pope_{split}.jsonl, eval.pope.image_folder=<root>/images
POPE_FILE = "eval/pope/pope_{split}.jsonl"
SYSTEM_FREE_FACTS = [  # text-only SFT records: the world's vocabulary, no image
    ("What shapes can appear in the images?", "Circles, squares, triangles, stars and crosses."),
    ("What colors can the shapes have?", "Red, green, blue, yellow, purple and orange."),
    ("How many shapes can an image have?", "An image has 1 to 5 shapes."),
]
FACT_CAPTION_TYPES = {"A": 2, "B": 3, "C": 4, "D": 5}


def _human(q: str, first: bool) -> str:
    return f"<image>\n{q}" if first else q


def _conversation(pairs: list[tuple[str, str]]) -> list[dict]:
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": _human(q, i == 0)})
        conv.append({"from": "gpt", "value": a})
    return conv


def build(n: int, seed: int, n_eval: Optional[int] = None, habit: float = 0.0,
          habit_object: str = "absent", habit_counted: bool = False) -> dict:
    """All records in memory, each generated item also carrying its ``spec`` (for tests/eval).

    Returns {"scenes": [Scene], "sft": [...], "preference": [...], "preference_eval": [...],
    "captions": {...}, "ppo": [...], "eval": {name: [items]}, and for checking: "items" (every
    faithful answer written, as (scene, spec, answer)), "planted" ((scene, spec, answer, kind) of
    every planted hallucination), "unhelpful" ((scene, spec, answer): faithful but less helpful
    outputs), "ppo_specs" ((scene, spec) per PPO prompt), "habit" ((scene, description) of every
    SFT description given an invented object)}. ``habit``: the share of SFT descriptions that name
    one extra object the scene does not have (``data.shapes_habit``); no other record changes with it.
    ``habit_object`` (``data.shapes_habit_object``): "absent", the extra object is of a (colour,
    shape) the scene lacks; "present", of one it has, in another cell. ``habit_counted``
    (``data.shapes_habit_counted``): the habit's stated count includes the invented object, and the
    planted description lies that invent an object are the habit's own (only then do the pairs change).
    """
    n_eval = max(10, n // 5) if n_eval is None else n_eval
    rng = random.Random(seed)
    scenes: list[Scene] = []
    seen: set = set()
    for split, count, prefix in (("train", n, "shapes"), ("eval", n_eval, "shapes_eval")):
        i = 0
        while i < count:
            sid = f"{prefix}_{i:06d}"
            s = random_scene(rng, sid, sid + ".png", split)
            if s.signature() in seen:  # train and eval scenes disjoint (and no duplicates at all)
                continue
            seen.add(s.signature())
            scenes.append(s)
            i += 1
    train = [s for s in scenes if s.split == "train"]
    evals = [s for s in scenes if s.split == "eval"]

    out: dict = {
        "scenes": scenes,
        "sft": [],
        "preference": [],
        "preference_eval": [],
        "captions": {},
        "ppo": [],
        "eval": {},
        "items": [],
        "planted": [],
        "unhelpful": [],
        "ppo_specs": [],
        "habit": [],
    }
    choice = {s.image: make_choice_spec(s, random.Random(f"{seed}-choice-{s.id}")) for s in scenes}
    for s in scenes:
        out["captions"][s.image] = s.to_captions()
        c = choice[s.image]
        out["captions"]["aok_" + s.image] = [
            f"The correct option is {c['answer']}: {c['options']['ABCD'.index(c['answer'])]}."
        ]

    def invent_object(s: Scene, rng: random.Random) -> str:
        """The SFT habit's description of ``s``: one invented object; counted (habit_counted), the
        text agrees with itself and only the scene's count or the object's place refutes it."""
        objs = with_absent_object(s, s.objects, rng, present=habit_object == "present")
        return s.describe(objs, len(objs) if habit_counted else len(s.objects))

    def item(s, spec):
        a = answer(spec, s)
        out["items"].append((s, spec, a))
        return question(spec), a

    # SFT: one multi-turn QA record + one description per scene; a few text-only records.
    for k, s in enumerate(train):
        r = random.Random(f"{seed}-sft-{s.id}")
        cats = r.sample(
            ["attribute", "adversarial", "comparison", "counting", "spatial", "environment", "other"], 2
        )
        specs = [make_spec(c, s, r) for c in cats]
        specs.append(make_exists_spec(s, r, present=r.random() < 0.5))
        if r.random() < 0.3:
            specs[r.randrange(3)] = choice[s.image]
        # Any question may open the conversation: POPE/MMHal ask single-turn, right after <image>.
        r.shuffle(specs)
        pairs = [item(s, sp) for sp in specs]
        out["sft"].append({"id": f"{s.id}-qa", "image": s.image, "conversations": _conversation(pairs)})
        q, a = item(s, make_spec("holistic", s, r))
        h = random.Random(f"{seed}-habit-{s.id}")  # its own stream: habit=0 leaves every record as it was
        if habit > 0 and h.random() < habit:
            # one invented object (counted or not, habit_counted): the lie is the detail, as in LLaVA's data
            a = invent_object(s, h)
            out["habit"].append((s, a))
        out["sft"].append({"id": f"{s.id}-desc", "image": s.image, "conversations": _conversation([(q, a)])})
        if k % 25 == 0:
            q, a = SYSTEM_FREE_FACTS[(k // 25) % len(SYSTEM_FREE_FACTS)]
            out["sft"].append(
                {
                    "id": f"text-{k}",
                    "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                }
            )

    # Preference pairs: 3 of 4 plant a hallucination, 1 of 4 differ only in helpfulness.
    def pairs_for(pool, key, per_scene):
        for s in pool:
            r = random.Random(f"{seed}-{key}-{s.id}")
            for j in range(per_scene):
                cat = r.choice(CATEGORIES)
                spec = choice[s.image] if r.random() < 0.1 else make_spec(cat, s, r)
                if not qtype(spec).yesno and spec["type"] != "choice" and r.random() < 0.1:
                    spec = make_exists_spec(s, r, present=r.random() < 0.5)
                good = answer(spec, s)
                halluc = r.random() < 0.75 or qtype(spec).yesno or spec["type"] == "choice"
                if halluc:
                    if habit > 0 and habit_counted and spec["type"] == "describe" and r.random() < 0.5:
                        # the SFT's own habit among the planted lies, as the paper's raters flag the
                        # hallucinations of the SFT model's own samples
                        bad, kind, lie = invent_object(s, r), "absent_object", "habit"
                    else:
                        bad, kind = hallucinate(spec, s, r)
                        lie = kind
                    out["planted"].append((s, spec, bad, kind))
                else:
                    bad, lie = less_helpful(spec, s, r), "unhelpful"
                    out["unhelpful"].append((s, spec, bad))
                out["items"].append((s, spec, good))
                pref = 1 if r.random() < 0.5 else 2
                o1, o2 = (good, bad) if pref == 1 else (bad, good)
                out[key].append(
                    {
                        "id": f"{s.id}-pref{j}",
                        "image": s.image,
                        "conversations": _conversation([(question(spec), good)]),
                        "output_1": {"value": o1},
                        "output_2": {"value": o2},
                        "preference": pref,
                        "hallucination": bool(halluc),
                        # metadata for the per-type RM table; not text (data._NON_TEXT_KEYS): the tiny
                        # tokenizer, trained on the files' texts, does not change with it
                        "question_type": question_type(spec, s),
                        # what the rejected output gets wrong (grammar.hallucinate's kind; "habit": the SFT
                        # data's own invented object; "unhelpful": nothing false, less said): the per-kind RM table
                        "lie_kind": lie,
                    }
                )

    pairs_for(train, "preference", 2)
    pairs_for(evals, "preference_eval", 1)

    # PPO prompts: caption_type 1 general, 2-5 multiple choice (answer A-D), 6 "No", 7 "Yes".
    for s in train:
        r = random.Random(f"{seed}-ppo-{s.id}")
        u = r.random()
        if u < 0.35:
            # Every MMHal category SFT teaches, as the recipe's PPO prompts are "our RL split of the
            # LLaVA data" (its SFT questions) + A-OKVQA + VQA-v2 yes/no (RLHF/README.md, PPO data
            # llava_ppo50k-aokvqa12k-vqa10k.json). Without the absent-object ("adversarial") ones
            # PPO never sees a question whose faithful answer is a denial: with the checker as its
            # reward (+1 right, -1 false, 0 otherwise) 20 PPO steps of the preset took held-out
            # adversarial hallucination 0.61 -> 0.89 with the old five categories; with all of
            # them 0.61 -> 0.05, though by answering "." (0 beat a guess), not by seeing the
            # objects (session 6; hence ppo.checker_vague).
            spec = make_spec(r.choice(CATEGORIES), s, r)
            while qtype(spec).yesno:
                spec = make_spec("holistic", s, r)
            ctype = 1
        elif u < 0.6:
            spec = choice[s.image]
            ctype = FACT_CAPTION_TYPES[spec["answer"]]
        else:
            spec = (
                make_exists_spec(s, r, present=r.random() < 0.5)
                if r.random() < 0.6
                else make_spec("spatial", s, r)
            )
            if not qtype(spec).yesno:
                spec = make_exists_spec(s, r, present=r.random() < 0.5)
            ctype = 7 if answer(spec, s) == "Yes." else 6
        # length_bonus scales the length penalty: short-answer prompts get the full penalty,
        # descriptions none (their answers are meant to be long).
        lb = 0.0 if spec["type"] == "describe" else 1.0
        out["ppo_specs"].append((s, spec))
        out["ppo"].append(
            {
                "id": f"{s.id}-ppo",
                "image": s.image,
                "conversations": [{"from": "human", "value": _human(question(spec), True)}],
                "spec": spec,  # the question, for the checker reward (ppo.reward_source); not text
                "question_type": question_type(spec, s),  # for ppo.question_types; not text
                "caption_type": ctype,
                "length_bonus": lb,
            }
        )

    out["eval"] = _eval_sets(train, evals, seed)
    return out


def _eval_item(s: Scene, spec: dict, idx: str, **extra) -> dict:
    d = {"id": idx, "image": s.image, "question": question(spec), "spec": spec, "answer": answer(spec, s)}
    d.update(extra)
    return d


def _eval_sets(train: list[Scene], evals: list[Scene], seed: int) -> dict:
    freq: dict[tuple[str, str], int] = {}
    co: dict[tuple[tuple[str, str], tuple[str, str]], int] = {}
    for s in train:
        names = [(o.color, o.shape) for o in s.objects]
        for a in names:
            freq[a] = freq.get(a, 0) + 1
            for b in names:
                if a != b:
                    co[(a, b)] = co.get((a, b), 0) + 1
    sets: dict[str, list] = {
        "pope_random": [],
        "pope_popular": [],
        "pope_adversarial": [],
        "mmhal": [],
        "chair": [],
    }
    for k, s in enumerate(evals):
        r = random.Random(f"{seed}-eval-{s.id}")
        present = [(o.color, o.shape) for o in s.objects]
        absent = s.absent()
        npos = min(3, len(present))
        pos = r.sample(present, npos)
        negs = {
            "random": r.sample(absent, npos),
            # POPE popular: the most frequent objects (in training scenes) that are absent
            "popular": sorted(absent, key=lambda a: (-freq.get(a, 0), a))[:npos],
            # POPE adversarial: absent objects co-occurring most with the present ones; here they
            # share a colour or shape with a present object (the most confusable).
            "adversarial": sorted(
                [a for a in absent if any(a[0] == p[0] or a[1] == p[1] for p in present)] or absent,
                key=lambda a: (-sum(co.get((a, p), 0) for p in present), a),
            )[:npos],
        }
        for split, neg in negs.items():
            qs = [(p, "yes") for p in pos] + [(a, "no") for a in neg]
            for j, ((c, sh), label) in enumerate(qs):
                spec = {"type": "exists", "color": c, "shape": sh}
                sets[f"pope_{split}"].append(
                    _eval_item(s, spec, f"{s.id}-{split}-{j}", label=label, category=split)
                )
        for j in range(2):  # MMHal-style: 8 categories cycled over the eval scenes
            cat = CATEGORIES[(2 * k + j) % len(CATEGORIES)]
            sets["mmhal"].append(_eval_item(s, make_spec(cat, s, r), f"{s.id}-mmhal-{j}", category=cat))
        sets["chair"].append(
            _eval_item(s, {"type": "describe", "variant": 0}, f"{s.id}-chair", category="holistic")
        )
    return sets


def pope_jsonl(items: list[dict]) -> str:
    """ShapesWorld POPE items as an official POPE question file (LLaVA-RLHF Eval/pope/*.jsonl): one
    {"question_id", "image", "text", "label"} per line, question ids 1.. in order. ``.jsonl``, so the
    tiny tokenizer's corpus (data.text_corpus reads *.json) does not change."""
    return "".join(json.dumps({"question_id": i + 1, "image": it["image"], "text": it["question"],
                               "label": it["label"]}) + "\n" for i, it in enumerate(items))


def _dump(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_dataset(out_dir, n: int, seed: int, image_size: int = 48, n_eval: Optional[int] = None,
                  habit: float = 0.0, habit_object: str = "absent", habit_counted: bool = False) -> dict:
    """Write a ShapesWorld dataset (LLaVA-RLHF formats) into ``out_dir``; returns counts/paths.

    Files: sft.json, preference.json, preference_eval.json, image_to_caption.json, ppo_prompts.json,
    scenes.json (the facts), eval/{pope_random,pope_popular,pope_adversarial,mmhal,chair}.json,
    the POPE sets again as official POPE question files eval/pope/pope_{random,popular,adversarial}.jsonl,
    images/*.png. Same (n, seed, image_size, n_eval) -> byte-identical files.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    data = build(n, seed, n_eval, habit, habit_object, habit_counted)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for s in data["scenes"]:
        # PNG without metadata chunks (no time stamps): byte-identical across runs.
        render(s, image_size).save(img_dir / s.image, format="PNG", optimize=False)
    files = {
        "sft": out / "sft.json",
        "preference": out / "preference.json",
        "preference_eval": out / "preference_eval.json",
        "captions": out / "image_to_caption.json",
        "ppo_prompts": out / "ppo_prompts.json",
        "scenes": out / "scenes.json",
    }
    _dump(files["preference"], data["preference"])
    _dump(files["preference_eval"], data["preference_eval"])
    _dump(files["captions"], data["captions"])
    _dump(files["ppo_prompts"], data["ppo"])
    _dump(files["scenes"], [s.to_dict() for s in data["scenes"]])
    for name, items in data["eval"].items():
        files[f"eval/{name}"] = out / "eval" / f"{name}.json"
        _dump(files[f"eval/{name}"], items)
    for split in POPE_SPLITS:  # the POPE sets again in POPE's own format, for the generic POPE path
        files[f"eval/pope/{split}"] = out / POPE_FILE.format(split=split)
        write_atomic(files[f"eval/pope/{split}"], pope_jsonl(data["eval"][f"pope_{split}"]))
    _dump(files["sft"], data["sft"])  # last: its presence marks a complete dataset (setup.ensure_dataset)
    counts = {
        "scenes_train": sum(s.split == "train" for s in data["scenes"]),
        "scenes_eval": sum(s.split == "eval" for s in data["scenes"]),
        "sft": len(data["sft"]),
        "preference": len(data["preference"]),
        "preference_eval": len(data["preference_eval"]),
        "ppo_prompts": len(data["ppo"]),
        **{f"eval/{k}": len(v) for k, v in data["eval"].items()},
    }
    return {
        "root": str(out),
        "images": str(img_dir),
        "counts": counts,
        "files": {k: str(v) for k, v in files.items()},
        "image_size": image_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def load_scenes(path) -> dict[str, Scene]:
    """scenes.json -> {image file name: Scene}."""
    with open(path) as f:
        return {d["image"]: Scene.from_dict(d) for d in json.load(f)}
