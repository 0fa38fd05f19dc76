"""A probe (session 17, not product code; README "Measured"): 1200 held-out description pairs whose
rejected output has one wrong colour or one wrong place (600 each; the lies only the image or the
captions refute), built from the held-out scenes of a ShapesWorld data root, and an RM's accuracy on them.

  python rm-colour-place-probe.py build runs/tiny/data
  python rm-colour-place-probe.py score <exp>/sft/final <exp>/seed0/fact/rm/reward_adapter fact runs/tiny/data

Results of session 17 (tiny preset, seeds 0-2): rm-colour-place-cpu-2cores.txt."""

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


def score(sft: str, adapter: str, arm: str, root: Path) -> None:
    import torch

    from factrl.model.io import load_adapter
    from factrl.trainers.config import load_config
    from factrl.trainers.data import load_captions, load_preferences
    from factrl.trainers.rm import score_pairs
    from factrl.trainers.setup import load_assets

    cfg = load_config("tiny", [f"data.root={root}", f"run.out_dir={root.parent}"])
    a = load_assets(cfg, Path(sft), quantize=True, device=torch.device("cpu"))
    a.model.eval()
    load_adapter(a.model, adapter, "reward", trainable=False)
    fact = arm == "fact"
    caps = load_captions(root / "image_to_caption.json") if fact else None
    pairs = load_preferences(root / "diag_pairs.json", a.tokenizer, a.num_image_tokens, cfg.data.max_seq_len, caps,
                             fact, template=cfg.data.fact_template, image_folder=str(root / "images"),
                             system=cfg.data.system_prompt, seed=0, shuffle_captions=False)
    kinds = {r["id"]: r["lie_kind"] for r in json.loads((root / "diag_pairs.json").read_text())}
    res: dict = {}
    for p, (c, r, _) in zip(pairs, score_pairs(a.model, pairs, 64, a.tokenizer.pad_token_id, a.images,
                                               torch.device("cpu"))):
        res.setdefault(kinds[p.id], []).append(c > r)
    print(arm, adapter, {k: (round(sum(v) / len(v), 3), len(v)) for k, v in res.items()}, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        score(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]))
