"""``factrl``: one console script, a subcommand per stage.

    factrl sft      [--config tiny|PATH.yaml] [key=value ...]
    factrl rm       ...
    factrl ppo      ...
    factrl eval     [--benchmark shapes|pope|mmhal|chair] ...
    factrl pipeline ...           # data → SFT → RM → PPO → eval (what `make train` runs)
    factrl experiment ...         # SFT once, then vanilla vs fact RM + PPO per seed (`make experiment`)
    factrl plan     --config llava-v1.5-13b [--gpu-gib 80] [key=value ...]
    factrl data shapes --out DIR --n N --seed S [--image-size 48]
    factrl convert  SRC DST [--vision-tower CLIP_DIR]   # original LLaVA layout → llava-hf

An expected error (a bad value, file, checkpoint or run directory, a full disk) prints one line
and exits 2; ``--debug`` (or FACTRL_DEBUG=1) shows its traceback. SIGINT/SIGTERM while training
checkpoint the last complete step and exit 130/143.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

from factrl.trainers.config import ConfigError, load_config

STAGES = {
    "sft": ("factrl.trainers.sft", "train_sft"),
    "rm": ("factrl.trainers.rm", "train_rm"),
    "ppo": ("factrl.trainers.ppo", "train_ppo"),
    "eval": ("factrl.trainers.eval_stage", "evaluate_stages"),
    "pipeline": ("factrl.trainers.pipeline", "run_pipeline"),
    "experiment": ("factrl.trainers.experiment", "run_experiment"),
}


MAX_GPU_GIB = 4096.0  # the largest single accelerator plan sizes for (an H200 has 141 GiB)


def _arch(checkpoint: str, name: str):
    """The architecture of a llava-hf checkpoint directory, else of a known name (model.plan.ARCH), else None."""
    from pathlib import Path

    from factrl.model.plan import ARCH, Arch

    if checkpoint and Path(checkpoint).is_dir():
        from factrl.model.io import read_llava_config

        _, hf = read_llava_config(Path(checkpoint))
        t, v = hf.text_config, hf.vision_config
        return Arch(t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                    t.num_key_value_heads or t.num_attention_heads, t.intermediate_size, t.vocab_size,
                    v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.image_size, v.patch_size)
    return Arch(**ARCH[name]) if name in ARCH else None


def _plan(cfg, gpu_gib: float, name: str, arch_name: str = "", reward_base: str = "", sft_gpus: int = 0) -> None:
    from factrl.model.plan import ARCH, arch_from_model_config, format_plan, format_sft_zero_plan, plan, plan_sft_zero

    if not (math.isfinite(gpu_gib) and 0 < gpu_gib <= MAX_GPU_GIB):
        raise ConfigError(f"--gpu-gib {gpu_gib}: expected the GPU's memory in GiB, 0 < gpu-gib <= {MAX_GPU_GIB:g}")

    if arch_name and arch_name not in ARCH:
        raise ConfigError(f"plan: --arch {arch_name!r} is not one of {', '.join(ARCH)}")
    arch = _arch(cfg.model.checkpoint, arch_name or name) or arch_from_model_config(cfg.model)
    if sft_gpus > 0:  # full SFT with DeepSpeed ZeRO-2 and ZeRO-3 on that many GPUs
        title, rows = arch_name or name, {}
        for stage in (2, 3):
            p = plan_sft_zero(arch, stage, sft_gpus, cfg.data.max_seq_len, cfg.sft.batch_size, gpu_gib,
                              offload_optimizer=cfg.run.deepspeed.offload_optimizer != "none")
            print(format_sft_zero_plan(title, p))
            rows[f"zero{stage}_gib"] = round(p["peak_bytes"] / 2 ** 30, 2)
            rows[f"zero{stage}_fits"] = p["fits"]
        print(json.dumps({"preset": name, "sft_gpus": sft_gpus, **rows}))
        return
    reward_base = reward_base or cfg.ppo.reward_base
    reward_arch = _arch(reward_base, reward_base) if reward_base else None
    if reward_base and reward_arch is None:
        raise ConfigError(f"plan: reward base {reward_base!r} is neither a checkpoint directory nor one of "
                          f"{', '.join(ARCH)}")
    p = plan(arch, cfg.model.lora.r, cfg.model.lora.targets, cfg.data.max_prompt_len, cfg.ppo.max_response_len,
             gpu_gib=gpu_gib, rollout_chunk=cfg.ppo.rollout_chunk_size, step_chunk=cfg.ppo.batch_size,
             blocksize=cfg.model.blocksize, reward_arch=reward_arch, init_adapter=bool(cfg.ppo.init_adapter))
    title = arch_name or name
    print(format_plan(title if reward_arch is None else f"{title} + reward/value on {reward_base}", p))
    extra = {"reward_base": reward_base} if reward_arch is not None else {}
    print(json.dumps({"preset": name, **extra, "peak_gib": round(p["peak_bytes"] / 2 ** 30, 2), "fits": p["fits"],
                      "max_rollout_chunk": p["max_rollout_chunk"], "max_step_chunk": p["max_step_chunk"]}))


def _expected_errors() -> tuple:
    """What a user can cause and fix (one line each); anything else is a bug and shows its traceback."""
    from factrl.model.io import CheckpointError as ModelCheckpointError
    from factrl.trainers.checkpoint import CheckpointError
    from factrl.trainers.data import DataError
    from factrl.trainers.run import RunDirError
    from factrl.trainers.stage import NonFiniteError

    return (ConfigError, DataError, CheckpointError, ModelCheckpointError, RunDirError, NonFiniteError, OSError,
            ValueError)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="factrl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="full tracebacks for expected errors (or FACTRL_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in [*STAGES, "plan"]:
        p = sub.add_parser(name)
        p.add_argument("--config", "--preset", dest="config", default="tiny",
                       help="preset name (tiny, llava-v1.5-7b, llava-v1.5-13b) or a YAML file")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", help="key=value overrides, nested keys with dots")
        if name == "plan":
            p.add_argument("--gpu-gib", type=float, default=80.0)
            p.add_argument("--arch", default="", help="the policy base's architecture by name (model.plan.ARCH), "
                                                      "when neither model.checkpoint nor the preset gives it")
            p.add_argument("--sft-gpus", type=int, default=0, help="per-GPU memory of full SFT with DeepSpeed "
                                                                  "ZeRO-2 and ZeRO-3 on this many GPUs")
            p.add_argument("--reward-base", default="", help="two-base mode: a checkpoint directory or an "
                                                             "architecture name (default: ppo.reward_base)")
        if name == "eval":  # = eval.benchmark=NAME (the benchmarks' files are eval.pope/mmhal/chair fields)
            p.add_argument("--benchmark", choices=["shapes", "pope", "mmhal", "chair"], default=None,
                           help="shapes: ShapesWorld's held-out sets (default); pope, mmhal, chair: the published "
                                "benchmarks from their files")
    d = sub.add_parser("data")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("shapes", help="write a ShapesWorld dataset in the LLaVA-RLHF formats")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=48)
    c = sub.add_parser("convert", help="rewrite an original-layout LLaVA checkpoint (LlavaLlamaForCausalLM) "
                                       "as a llava-hf directory")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--vision-tower", default=None,
                   help="the local CLIP directory (default: the checkpoint's mm_vision_tower, if local)")
    args = ap.parse_args(argv)
    debug = args.debug or os.environ.get("FACTRL_DEBUG", "") not in ("", "0")

    from factrl.trainers.stage import Interrupted

    try:
        return _run(args)
    except Interrupted as e:
        print(f"factrl: {e}", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt:
        print("factrl: interrupted (nothing was training: no checkpoint written)", file=sys.stderr)
        return 130
    except ConfigError as e:
        if debug:
            traceback.print_exc()
        print(f"factrl: config error: {e}", file=sys.stderr)
        return 2
    except _expected_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"factrl: error: {e}" + ("" if debug else "  (--debug for the traceback)"), file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.cmd == "convert":
        from factrl.model.original import convert_original

        print(json.dumps(convert_original(args.src, args.dst, args.vision_tower)))
        return 0
    if args.cmd == "data":
        from factrl.trainers.shapesworld.dataset import write_dataset

        info = write_dataset(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
        print(json.dumps(info, default=str))
        return 0
    overrides = list(args.overrides)
    if getattr(args, "benchmark", None):
        overrides.append(f"eval.benchmark={args.benchmark}")
    cfg = load_config(args.config, overrides)
    if args.cmd == "plan":
        _plan(cfg, args.gpu_gib, args.config, args.arch, args.reward_base, args.sft_gpus)
        return 0
    import importlib
    from pathlib import Path

    from factrl.trainers.embedded import prepare
    from factrl.trainers.run import lock_out_dir, resolve_device

    # Before any model or data work: the device exists, and the run directory is this run's.
    resolve_device(cfg.run.device)
    lock_out_dir(Path(cfg.experiment.out_dir if args.cmd == "experiment" else cfg.run.out_dir))
    if args.cmd != "experiment":  # the experiment prepares its own, under experiment.out_dir
        prepare(cfg)  # the embedded default (no model.checkpoint): ShapesWorld + the tiny base, on first use
    mod, fn = STAGES[args.cmd]
    result = getattr(importlib.import_module(mod), fn)(cfg)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
