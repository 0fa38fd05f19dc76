"""``factrl eval``: the SFT model and the PPO policy side by side on the held-out sets.

Both run on the same NF4 base PPO used (SFT = adapters off, PPO = the ``policy`` adapter), so
the table isolates what RLHF changed. A third column, ``blind``, answers every question with the
SFT data's most frequent answer to it without looking at the image: the chance level a model must
beat. Also the reward model's pairwise accuracy on held-out preference pairs (overall, on the
hallucination pairs, per question type). Scoring is programmatic against the ShapesWorld facts
(trainers/shapesworld/scoring.py). ``ppo_eval_fn`` is the same scoring on a few held-out items,
as the hook ``train_ppo`` calls during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from factrl.trainers import benchmarks as bench
from factrl.trainers.config import Config, ConfigError
from factrl.trainers.data import SYSTEM_PROMPT, image_loader, pad, pad_mask, record_fields, render_query
from factrl.trainers.metrics import format_table, rm_accuracy, rm_accuracy_by
from factrl.trainers.run import RunLayout
from factrl.trainers.setup import Assets, load_assets
from factrl.trainers.shapesworld.scoring import blind_answers, run_eval
from factrl.trainers.stage import Stage


def make_generate_fn(model, tok, images, num_image_tokens: int, adapter, max_new_tokens: int, device,
                     system: str = SYSTEM_PROMPT, temperature: Optional[float] = None,
                     generator: Optional[torch.Generator] = None):
    """items → answers, with ``adapter`` active (None = the base); ``system``: data.system_prompt.
    Greedy, or sampled at ``temperature`` from ``generator`` when a temperature is given."""

    @torch.no_grad()
    def generate(items: list[dict]) -> list[str]:
        queries = [render_query(tok, it["question"], num_image_tokens, bool(it.get("image")), system)
                   for it in items]
        ids = pad(queries, tok.pad_token_id, left=True).to(device)
        mask = pad_mask(queries, left=True).to(device)
        px = [images(it["image"]) for it in items if it.get("image")]
        feats = model.encode_images(torch.stack(px).to(device)) if px else None
        with model.adapter(adapter):
            g = model.generate(ids, mask, image_features=feats, max_new_tokens=max_new_tokens,
                               greedy=temperature is None, temperature=temperature or 1.0, generator=generator,
                               suppress_ids=(model.image_token_id, tok.pad_token_id))
        return [tok.decode(g.tokens[i, :int(g.lengths[i])].tolist(), skip_special_tokens=True).strip()
                for i in range(len(items))]

    return generate


def rm_eval(model, a, cfg: Config, device) -> dict:
    """The reward model's pairwise accuracy on the held-out preference pairs ({} without an RM),
    a fact RM's also with other images' facts (``accuracy_other_scenes_facts``), and
    ``per_question_type`` when the records carry a ``question_type``, ``per_lie_kind`` (keyed
    "<question type>: <lie kind>") when they also carry a ``lie_kind`` (what the rejected output gets
    wrong: which lies an RM catches)."""
    from factrl.trainers.rm import ROLE, Reading, load_pairs, score_pairs

    if ROLE not in model.adapter_state.names:
        return {}
    reading = Reading.of(cfg.rm)
    _, held = load_pairs(cfg, a, cfg.rm.fact_augmented, held_only=True)
    triples = score_pairs(model, held, cfg.eval.batch_size, a.tokenizer.pad_token_id, a.images, device, reading)
    res = rm_accuracy(triples)
    if cfg.rm.fact_augmented:  # the same pairs with every image's facts another image's: a fact RM that
        # reads its facts loses accuracy here; one at its true-facts accuracy judges the response alone
        _, other = load_pairs(cfg, a, True, held_only=True, other_scenes=True)
        res["accuracy_other_scenes_facts"] = rm_accuracy(score_pairs(
            model, other, cfg.eval.batch_size, a.tokenizer.pad_token_id, a.images, device, reading))["accuracy"]
    meta = held_out_fields(cfg, a.data_root, ("question_type", "lie_kind"))
    types, lies = meta["question_type"], meta["lie_kind"]
    if types:  # scored pairs are in load order; pairs dropped as too long are simply absent
        res["per_question_type"] = rm_accuracy_by(triples, [types.get(e.id) for e in held])
        if lies:  # "<question type>: <lie kind>", e.g. "holistic: wrong_attribute"
            res["per_lie_kind"] = rm_accuracy_by(
                triples, [f"{types[e.id]}: {lies[e.id]}" if e.id in types and e.id in lies else None for e in held])
    return res


def held_out_fields(cfg: Config, root: Path, fields=("question_type",)) -> dict[str, dict[str, str]]:
    """{field: {record id: value}} (``data.record_fields``) of the file the held-out pairs come from
    (as ``rm.load_pairs``)."""
    name = cfg.data.preference_eval_file
    return record_fields(root / (name if name and (root / name).is_file() else cfg.data.preference_file), fields)


COLUMNS = ("sft", "ppo", "blind")


def evaluate_stages(cfg: Config, columns=COLUMNS) -> dict:
    """``factrl eval``: the ``columns`` (of sft, ppo, blind) side by side; the headline numbers.
    With ``eval.benchmark`` pope, mmhal or chair: that published benchmark (``evaluate_benchmark``)."""
    if cfg.eval.benchmark != "shapes":
        return evaluate_benchmark(cfg, tuple(c for c in columns if c != "blind"))
    results = evaluate_models(cfg, columns)
    table = format_table(results)
    print(table)
    out = RunLayout(Path(cfg.run.out_dir)).stage("eval")
    (out / "table.txt").write_text(table + "\n")
    summary = {name: headline(r) for name, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate_models(cfg: Config, columns=COLUMNS) -> dict:
    """{column: full results} for the ``columns`` that exist (ppo needs a policy adapter, blind the
    SFT data); each also written to ``<run.out_dir>/eval/<column>.json``, RM accuracy included."""
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown eval columns {unknown} (known: {', '.join(COLUMNS)})")
    sets = sorted((Path(cfg.data.root) / cfg.data.eval_dir).glob("*.json"))
    if not sets:  # an all-"-" table that exits 0 would look like a result
        from factrl.trainers.data import DataError

        raise DataError(Path(cfg.data.root) / cfg.data.eval_dir, msg="no eval sets (*.json) there: nothing to "
                        "evaluate (data.root / data.eval_dir; ShapesWorld writes POPE, MMHal and CHAIR sets)")
    stage = Stage(cfg, "eval", trains=False)
    device, out = stage.device, stage.out
    a, ra, adapters = load_models(cfg, stage, columns, reward=True)
    model = a.model
    rm = rm_eval(ra.model, ra, cfg, device) if adapters else {}
    gens = {name: make_generate_fn(model, a.tokenizer, a.images, a.num_image_tokens, adapter,
                                   cfg.eval.max_new_tokens, device, cfg.data.system_prompt)
            for name, adapter in adapters.items()}
    sft_file = a.data_root / cfg.data.sft_file
    if "blind" in columns and sft_file.is_file():  # the blind baseline needs the SFT answers
        with open(sft_file) as f:
            gens["blind"] = blind_answers(json.load(f))
    if not gens:
        raise ValueError(f"nothing to evaluate: none of the columns {', '.join(columns)} exists in {cfg.run.out_dir}")
    results = {}
    for name, gen in gens.items():
        res = run_eval(gen, a.data_root, max_items=cfg.eval.max_items or None, progress=cfg.run.progress,
                       batch_size=cfg.eval.batch_size, eval_dir=cfg.data.eval_dir)
        if rm and name != "blind":
            res["rm"] = rm
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        results[name] = res
    return results


def load_models(cfg: Config, stage: Stage, columns, reward: bool) -> tuple[Assets, Assets, dict]:
    """The NF4 base PPO's policy used, with its policy adapter for a ppo column, and (``reward``)
    this run's reward adapter on the base it lives on: ``ppo.reward_base`` in two-base mode (read
    with its own tower and image size), else the same one. (policy assets, reward assets,
    {column: adapter}) for the sft (adapters off) and ppo columns that exist."""
    from factrl.model.io import load_adapter
    from factrl.trainers.ppo import policy_base

    layout = stage.layout
    a = load_assets(cfg, policy_base(cfg, layout), quantize=cfg.model.quantize, device=stage.device)
    a.model.eval()
    ra = a
    rm_dir = Path(cfg.ppo.reward_adapter or layout.reward_adapter)
    if reward and rm_dir.is_dir():
        if cfg.ppo.reward_base:
            ra = load_assets(cfg, Path(cfg.ppo.reward_base), quantize=cfg.model.quantize, device=stage.device)
            ra.model.eval()
        from factrl.trainers.rm import Reading, check_reading

        check_reading(rm_dir, Reading.of(cfg.rm))
        load_adapter(ra.model, rm_dir, "reward", trainable=False)
    adapters = {"sft": None} if "sft" in columns else {}
    if "ppo" in columns and layout.policy_adapter.is_dir():
        load_adapter(a.model, layout.policy_adapter, "policy", trainable=False)
        adapters["ppo"] = "policy"
    return a, ra, adapters


# ---- the published benchmarks (trainers/benchmarks.py) ------------------------------------------------------
BENCHMARKS = ("shapes", "pope", "mmhal", "chair")
_POPE_ROWS = [("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("F1", "f1"),
              ("yes-ratio", "yes_ratio")]
_CHAIR_ROWS = [("CHAIR_i ↓", ("chair_i",)), ("CHAIR_s ↓", ("chair_s",)), ("object recall ↑", ("recall",)),
               ("captions", ("n",))]


def pope_files(cfg: Config, splits) -> dict[str, Path]:
    """{split: question file} of ``eval.pope``, each checked to exist."""
    p = cfg.eval.pope
    if not p.folder:
        raise ConfigError("POPE needs eval.pope.folder: the folder of its question files "
                          f"({p.file_pattern.format(split='<split>')})")
    files = {s: Path(p.folder) / p.file_pattern.format(split=s) for s in splits}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ConfigError(f"POPE question file(s) not found: {', '.join(missing)} (eval.pope.folder, "
                          "eval.pope.file_pattern, eval.pope.splits)")
    return files


def _folder(explicit: str, default: Path) -> str:
    return explicit or str(default)


def evaluate_benchmark(cfg: Config, columns=("sft", "ppo")) -> dict:
    """``factrl eval --benchmark pope|mmhal|chair``: the sft / ppo columns on the benchmark's files
    (eval.pope / eval.mmhal / eval.chair), greedy and batched. Writes ``<run.out_dir>/eval/<benchmark>/``:
    the responses in the benchmark's own format, ``<column>.json``, ``table.txt`` and ``summary.json``;
    returns the summary. MMHal without ``eval.judge.base_url`` writes the responses and says how to
    score them."""
    e, name = cfg.eval, cfg.eval.benchmark
    if name not in BENCHMARKS:
        raise ConfigError(f"eval.benchmark={name!r}: unknown (known: {', '.join(BENCHMARKS)})")
    out = RunLayout(Path(cfg.run.out_dir)).stage("eval") / name
    # 1. the benchmark's files, read before any model loads (a wrong path fails in a second)
    if name == "pope":
        files = pope_files(cfg, e.pope.splits)
        images, max_new = _folder(e.pope.image_folder, Path(e.pope.folder) / "images"), e.pope.max_new_tokens
        run = lambda gen, col: bench.run_pope(gen, files, e.pope.suffix, e.max_items or None, e.batch_size,  # noqa: E731
                                              cfg.run.progress, out, col)
    elif name == "mmhal":
        if e.mmhal.responses:  # 1b. judge a responses file written before (e.g. responses_sft.json): no model
            col = Path(e.mmhal.responses).stem.removeprefix("responses_")
            return _judge_mmhal(cfg, {col: bench.load_mmhal(e.mmhal.responses)}, out)
        if not e.mmhal.folder:
            raise ConfigError("MMHal-Bench needs eval.mmhal.folder (response_template.json + images/) "
                              "or eval.mmhal.responses (a responses file to judge)")
        records = bench.load_mmhal(Path(e.mmhal.folder) / e.mmhal.file)[:e.max_items or None]
        images, max_new = _folder(e.mmhal.image_folder, Path(e.mmhal.folder) / "images"), e.mmhal.max_new_tokens
        run = lambda gen, col: bench.mmhal_responses(gen, records, e.mmhal.suffix, e.batch_size,  # noqa: E731
                                                     cfg.run.progress, col)
    elif name == "chair":
        c = e.chair
        if not c.annotations:
            raise ConfigError("CHAIR needs eval.chair.annotations (a COCO instances_*.json)")
        chair = bench.Chair()
        objects, names = bench.coco_objects(chair, c.annotations, c.captions)
        ids = (bench.read_image_ids(c.image_ids) if c.image_ids else sorted(names))[:e.max_items or None]
        images, max_new = _folder(c.image_folder, Path(c.annotations).parent), c.max_new_tokens
        run = lambda gen, col: bench.run_chair(gen, chair, objects, names, ids, c.prompt, e.batch_size,  # noqa: E731
                                               cfg.run.progress, out, col)
    else:
        raise ConfigError("eval.benchmark=shapes is evaluate_models' (factrl eval without --benchmark)")
    # 2. the models: the base (sft) and the PPO policy, as evaluate_models
    stage = Stage(cfg, "eval", trains=False)
    out.mkdir(parents=True, exist_ok=True)
    a, _, adapters = load_models(cfg, stage, columns, reward=False)
    loader = image_loader(images, a.processor, cfg.data.image_aspect)
    # 3. generate and score, column by column
    results = {}
    for col, adapter in adapters.items():
        gen = make_generate_fn(a.model, a.tokenizer, loader, a.num_image_tokens, adapter, max_new or e.max_new_tokens,
                               stage.device, cfg.data.system_prompt)
        results[col] = run(gen, col)
    if name == "mmhal":
        answered = {}
        for col, recs in results.items():  # model_vqa_mmhal.py:194 writes the list with indent=2
            bench._write_json(out / f"responses_{col}.json", recs)
            answered[col] = recs
        return _judge_mmhal(cfg, answered, out)
    for col, res in results.items():
        (out / f"{col}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    rows = ([(f"POPE {what} {split}", (split, key)) for split in e.pope.splits for what, key in _POPE_ROWS]
            if name == "pope" else _CHAIR_ROWS)
    table = format_table(results, rows)
    return _finish(out, table, {col: {k: v for k, v in r.items() if k != "sentences"} for col, r in results.items()})


def _finish(out: Path, table: str, summary: dict) -> dict:
    print(table)
    (out / "table.txt").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _judge_mmhal(cfg: Config, answered: dict[str, list[dict]], out: Path) -> dict:
    """Judge each column's answered records (eval.judge) and tabulate per question type; without a
    judge endpoint, say how to score the responses files."""
    j = cfg.eval.judge
    out.mkdir(parents=True, exist_ok=True)
    files = {col: out / f"responses_{col}.json" for col in answered}
    for col, recs in answered.items():
        missing = [i for i, r in enumerate(recs) if "model_answer" not in r]
        if missing:
            raise ConfigError(f"{cfg.eval.mmhal.responses or files[col]}: records {missing[:5]} have no "
                              "model_answer (a responses file is response_template.json with model_answer filled in)")
        if not files[col].is_file():
            bench._write_json(files[col], recs)
    if not j.base_url:
        f = next(iter(files.values()))
        print(f"[factrl] MMHal-Bench: no judge configured (eval.judge.base_url); responses written to "
              f"{', '.join(str(p) for p in files.values())}. Score them with\n"
              f"  factrl eval --benchmark mmhal eval.mmhal.responses={f} eval.judge.base_url=https://api.openai.com/v1 "
              f"eval.judge.model={j.model}   (key from ${j.api_key_env})\n"
              f"or LLaVA-RLHF's own: python Eval/eval_gpt_mmhal.py --response {f} --evaluation reviews.json "
              f"--api-key KEY --gpt-model {j.model}")
        return {col: {"responses": str(p), "judged": False} for col, p in files.items()}
    scores = {}
    for col, recs in answered.items():
        reviews = bench.judge_mmhal(recs, j.base_url, j.model, bench.api_key(j.api_key_env), j.temperature,
                                    j.timeout_s, j.retries, j.retry_wait_s, cfg.run.progress)
        bench._write_json(out / f"reviews_{col}.json", reviews)  # eval_gpt_mmhal.py --evaluation: the replies
        scores[col] = bench.score_mmhal(recs, reviews)
        (out / f"{col}.json").write_text(json.dumps(scores[col], indent=1) + "\n")
    summary = {col: {"score": s["score"], "hallucination_rate": s["hallucination_rate"], "n": s["n"],
                     "per_type": s["per_type"], "responses": str(files[col])} for col, s in scores.items()}
    return _finish(out, bench.mmhal_table(scores), summary)


def ppo_eval_fn(cfg: Config) -> Optional[Callable[[Assets, int], dict]]:
    """The hook ``train_ppo`` calls every ``ppo.eval_every`` steps (None when 0) with its own assets:
    the policy's greedy answers to the first ``ppo.eval_items`` items of MMHal and POPE adversarial,
    scored - or, with ``eval.ppo_set=pope_<split>``, of that split of the POPE files (eval.pope)."""
    if cfg.ppo.eval_every <= 0:
        return None
    if cfg.eval.ppo_set != "shapes":
        return _pope_eval_fn(cfg)

    def eval_fn(a: Assets, step: int) -> dict:
        gen = make_generate_fn(a.model, a.tokenizer, a.images, a.num_image_tokens, "policy",
                               cfg.eval.max_new_tokens, a.model.embed_tokens.weight.device, cfg.data.system_prompt)
        res = run_eval(gen, a.data_root, max_items=cfg.ppo.eval_items, progress=False,
                       batch_size=cfg.eval.batch_size, eval_dir=cfg.data.eval_dir,
                       only=("mmhal", "pope_adversarial"))
        h = headline(res)
        keys = ("hallucination_rate", "mmhal_score", "pope_f1_adversarial", "pope_yes_ratio_adversarial")
        return {k: h[k] for k in keys if h[k] is not None}

    return eval_fn


def _pope_eval_fn(cfg: Config) -> Callable[[Assets, int], dict]:
    """The PPO hook on one split of the POPE files: pope_{accuracy,f1,yes_ratio}_<split>."""
    split = cfg.eval.ppo_set.removeprefix("pope_")
    if not cfg.eval.ppo_set.startswith("pope_") or split not in bench.POPE_SPLITS:
        raise ConfigError(f"eval.ppo_set={cfg.eval.ppo_set!r}: expected shapes or pope_<split> "
                          f"({', '.join(bench.POPE_SPLITS)})")
    files = pope_files(cfg, [split])  # checked now, before PPO trains
    p = cfg.eval.pope
    loaders: dict = {}

    def eval_fn(a: Assets, step: int) -> dict:
        if "images" not in loaders:
            loaders["images"] = image_loader(_folder(p.image_folder, Path(p.folder) / "images"), a.processor,
                                             cfg.data.image_aspect)
        gen = make_generate_fn(a.model, a.tokenizer, loaders["images"], a.num_image_tokens, "policy",
                               p.max_new_tokens or cfg.eval.max_new_tokens, a.model.embed_tokens.weight.device,
                               cfg.data.system_prompt)
        m = bench.run_pope(gen, files, p.suffix, cfg.ppo.eval_items, cfg.eval.batch_size)[split]
        return {f"pope_{k}_{split}": m[k] for k in ("accuracy", "f1", "yes_ratio")}

    return eval_fn


def headline(r: dict) -> dict:
    """The few numbers the pipeline's last JSON line carries."""
    g = lambda *p: dig(r, *p)  # noqa: E731
    return {"hallucination_rate": g("hallucination_rate"), "mmhal_score": g("mmhal", "score"),
            "pope_accuracy_random": g("pope", "random", "accuracy"),
            "pope_accuracy_adversarial": g("pope", "adversarial", "accuracy"),
            "pope_f1_random": g("pope", "random", "f1"), "pope_f1_popular": g("pope", "popular", "f1"),
            "pope_f1_adversarial": g("pope", "adversarial", "f1"),
            "pope_yes_ratio_adversarial": g("pope", "adversarial", "yes_ratio"), "chair_i": g("chair", "chair_i"),
            "chair_s": g("chair", "chair_s"), "chair_coverage": g("chair", "coverage"),
            "mmhal_response_words": g("mmhal", "response_words"), "rm_accuracy": g("rm", "accuracy"),
            "rm_accuracy_hallucination": g("rm", "accuracy_hallucination"),
            "rm_accuracy_other_scenes_facts": g("rm", "accuracy_other_scenes_facts")}


def dig(d, *path):
    """``d[k1][k2]...`` along ``path``, None where a key is missing (results may lack a set)."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
