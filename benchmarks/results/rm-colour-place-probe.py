"""A probe (session 17, not product code; README "Measured"): 1200 held-out description pairs whose
rejected output has one wrong colour or one wrong place (600 each; the lies only the image or the
captions refute), built from the held-out scenes of a ShapesWorld data root, and an RM's accuracy on them.

  python rm-colour-place-probe.py build runs/tiny/data
  python rm-colour-place-probe.py build-degenerate runs/tiny/data   # then score with
      data.preference_eval_file=degen_pairs.json
  python rm-colour-place-probe.py score <exp>/sft/final <exp>/seed0/fact/rm/reward_adapter fact runs/tiny/data \
      [key=value ...]

(key=value: config overrides, e.g. rm.score_pool=last for an RM trained so.) Results of sessions 17
and 18 (tiny preset, seeds 0-4): rm-colour-place-cpu-2cores.txt."""

import json
import random
import sys
from pathlib import Path

PER_KIND = 600


def _record(s, kind: str, good: str, bad: str, pref: int) -> dict:
    outs = (good, bad) if pref == 1 else (bad, good)
    return {"id": f"{s.id}-{kind}", "image": s.image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                              {"from": "gpt", "value": good}],
            "output_1": {"value": outs[0]}, "output_2": {"value": outs[1]}, "preference": pref,
            "hallucination": True, "question_type": "holistic", "lie_kind": kind}


def build(root: Path) -> None:
    from factrl.trainers.shapesworld.scenes import COLORS, POSITIONS, Obj, Scene

    scenes = [Scene.from_dict(d) for d in json.loads((root / "scenes.json").read_text())]
    rng = random.Random(123)
    recs: list = []
    for s in (s for s in scenes if s.split == "eval" and len(s.objects) > 1):
        for kind in ("wrong_attribute", "wrong_relation"):
            objs, i = list(s.objects), rng.randrange(len(s.objects))
            o = objs[i]
            if kind == "wrong_attribute":  # a colour no object of that shape has
                objs[i] = Obj(o.shape, rng.choice([c for c in COLORS if not s.find(color=c, shape=o.shape)]),
                              o.size, o.row, o.col)
            else:  # moved to a free cell
                free = [p for p in sorted(POSITIONS) if not s.find(pos=POSITIONS[p])]
                if not free:
                    continue
                r, c = rng.choice(free)
                objs[i] = Obj(o.shape, o.color, o.size, r, c)
            objs.sort(key=lambda x: (x.row, x.col))  # reading order, as a faithful description
            recs.append(_record(s, kind, s.describe(), s.describe(objs), 1 if rng.random() < 0.5 else 2))
        if sum(r["lie_kind"] == "wrong_relation" for r in recs) >= PER_KIND:
            break
    (root / "diag_pairs.json").write_text(json.dumps(recs))
    print(len(recs), "pairs")


def build_degenerate(root: Path, n: int = 150) -> None:
    """``degen_pairs.json``: a held-out scene's faithful description against what a policy might drift to
    that says nothing false — "." , a bare "A <background> background with shapes.", the description
    twice, the captions themselves — one pair of each per scene (session 19: is the facts' likelihood a
    reward such text could beat?). Score with ``data.preference_eval_file=degen_pairs.json``."""
    from factrl.trainers.shapesworld.scenes import Scene

    scenes = [Scene.from_dict(d) for d in json.loads((root / "scenes.json").read_text())]
    caps = json.loads((root / "image_to_caption.json").read_text())
    rng = random.Random(5)
    recs: list = []
    for s in [s for s in scenes if s.split == "eval" and len(s.objects) > 1][:n]:
        good = s.describe()
        for kind, bad in (("dot", "."), ("generic", f"A {s.background} background with shapes."),
                          ("twice", good + " " + good), ("captions", " ".join(caps[s.image]))):
            r = _record(s, kind, good, bad, 1 if rng.random() < 0.5 else 2)
            recs.append({**r, "hallucination": False})
    (root / "degen_pairs.json").write_text(json.dumps(recs))
    print(len(recs), "pairs")


def score(sft: str, adapter: str, arm: str, root: Path, overrides=()) -> None:
    """The RM's accuracy per lie kind on the pairs ``build`` wrote: the RM stage's own loader
    (``rm.load_pairs``, the preset's template and caption order) and scorer."""
    import torch

    from factrl.model.io import load_adapter
    from factrl.trainers.config import load_config
    from factrl.trainers.data import record_fields
    from factrl.trainers.metrics import rm_accuracy_by
    from factrl.trainers.rm import Reading, check_reading, load_pairs, score_pairs
    from factrl.trainers.setup import load_assets

    cfg = load_config("tiny", [f"data.root={root}", f"run.out_dir={root.parent}",
                               "data.preference_eval_file=diag_pairs.json", f"rm.fact_augmented={arm == 'fact'}",
                               *overrides])
    check_reading(adapter, Reading.of(cfg.rm))  # read as it was trained
    cpu = torch.device("cpu")
    a = load_assets(cfg, Path(sft), quantize=True, device=cpu)
    a.model.eval()
    load_adapter(a.model, adapter, "reward", trainable=False)
    _, held = load_pairs(cfg, a, cfg.rm.fact_augmented, held_only=True)
    triples = score_pairs(a.model, held, 64, a.tokenizer.pad_token_id, a.images, cpu, Reading.of(cfg.rm))
    kinds = record_fields(root / cfg.data.preference_eval_file, ("lie_kind",))["lie_kind"]
    by = rm_accuracy_by(triples, [kinds[e.id] for e in held])
    print(arm, adapter, {k: (round(v["accuracy"], 3), v["n"]) for k, v in by.items()}, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    elif sys.argv[1] == "build-degenerate":
        build_degenerate(Path(sys.argv[2]))
    else:
        score(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]), sys.argv[6:])
