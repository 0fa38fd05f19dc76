"""Configs: one dataclass per concern, loaded from YAML, overridden with ``key=value``.

``load_config("tiny", ["ppo.lr=1e-5", "model.lora.r=8"])`` reads a preset (a name in
``trainers/presets/`` or a path to a YAML file), applies dotted overrides, and type-checks
every value. Unknown keys are errors that name the full dotted key. The resolved config is
saved (``save_config``) beside every checkpoint and log.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    pass


@dataclass
class LoraConfig:
    """The LoRA adapters of every role (qlora SFT, reward, policy, value)."""

    r: int = 8  # rank
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input (the recipe uses 0)
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])  # decoder linears


@dataclass
class TinyModelConfig:
    """The embedded default: a tiny LLaVA built from scratch (random init) on CPU."""

    hidden_size: int = 128  # decoder width
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention, as LLaMA-2/3)
    intermediate_size: int = 352  # SwiGLU MLP width
    vocab_size: int = 512  # the BPE tokenizer trained on the dataset's texts
    vision_hidden_size: int = 64  # CLIP tower width
    vision_layers: int = 3  # CLIP tower layers
    vision_heads: int = 4  # CLIP tower heads
    image_size: int = 48  # pixels per side (must equal data.shapes_image_size)
    # 16 px patches tile ShapesWorld's 3x3 grid of 16 px cells: one image token per cell.
    patch_size: int = 16
    max_position_embeddings: int = 512  # longest sequence (image tokens included)
    # The recipe's CLIP tower is pretrained; the tiny one is pretrained on ShapesWorld's training
    # scenes (per-patch colour/shape/size, model.tiny.pretrain_patch_features) when the base is
    # built, then frozen like the recipe's. 0 = leave it random.
    vision_pretrain_steps: int = 400


@dataclass
class ModelConfig:
    # A local llava-hf checkpoint directory; empty = the embedded tiny model (built on first use
    # under run.out_dir/tiny_base).
    checkpoint: str = ""
    quantize: bool = True  # NF4 base for the RM/PPO stages (SFT 'full' mode never quantizes)
    double_quant: bool = True  # absmax quantized to 8 bits per 256 blocks, as bitsandbytes' double quant
    blocksize: int = 64  # NF4 elements per absmax block (bitsandbytes' layout)
    dtype: str = "float32"  # compute dtype on GPU: float32 | bfloat16 | float16 (CPU always fp32)
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


# The conversation's system line in LLaVA's conv_vicuna_v1 template, which the recipe's models use
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass
class DataConfig:
    # Folder holding the LLaVA-RLHF-format files below; for the tiny preset ShapesWorld writes
    # them there on first use.
    root: str = ""
    image_folder: str = "images"  # images, relative to root
    sft_file: str = "sft.json"  # SFT conversations
    preference_file: str = "preference.json"  # RM training pairs
    preference_eval_file: str = "preference_eval.json"  # RM held-out pairs; absent = carved (rm.eval_size)
    captions_file: str = "image_to_caption.json"  # the facts the fact-augmented RM reads
    ppo_prompts_file: str = "ppo_prompts.json"  # PPO prompts with caption_type / length_bonus
    eval_dir: str = "eval"  # held-out eval sets (ShapesWorld: POPE, MMHal-style, CHAIR)
    # RM prompt: original (the recipe's 4-criterion file, empty = it) | factrl (one short sentence) | a file path
    fact_template: str = ""
    # Shuffle the fact RM's captions at every use, each output of a pair its own order (the recipe:
    # RLHF/data_utils/data_utils_rm.py:85-90, ppo_trainer.py:356-361); false = the captions file's
    # order, the same for both outputs of a pair
    shuffle_captions: bool = True
    # The system line before the first "USER:" of every SFT, RM, PPO and eval sequence; "" = none
    # (the tiny preset: the vicuna line is 29 of its ~88 tokens per SFT example)
    system_prompt: str = VICUNA_SYSTEM
    max_seq_len: int = 256  # SFT / RM examples longer than this (tokens) are dropped and counted
    max_prompt_len: int = 128  # PPO prompts longer than this (text tokens) are dropped and counted
    image_aspect: str = "pad"  # pad (LLaVA: pad to square with the mean colour) | resize
    skip_bad_records: bool = False  # skip and count bad records instead of stopping at the first
    shapes_n: int = 2000  # ShapesWorld scenes generated for the tiny preset
    shapes_seed: int = 0  # ShapesWorld generator seed
    shapes_image_size: int = 48  # ShapesWorld image side in pixels
    # Share of ShapesWorld's SFT descriptions that name one extra object the scene does not have,
    # as LLaVA's GPT-written instruction data names plausible objects that are not in the image:
    # the hallucination habit Fact-RLHF is meant to remove (0 = faithful SFT data)
    shapes_habit: float = 0.0
    # What the habit invents: "absent", an object of a (colour, shape) the scene has none of (an
    # existence check of the image refutes it, as POPE's questions do) | "present", a second object
    # of a (colour, shape) the scene has, in a free cell (only its count or place refutes it, as a
    # plausible co-occurring object in a real photo: the image is the weaker witness, the captions
    # name every object and place)
    shapes_habit_object: str = "absent"
    # The habit's description counts its invented object ("with 4 shapes:" listing 4 where the scene
    # has 3): a lie consistent with itself, so no reading of the text alone refutes it — only the
    # image (count the shapes, place each one) or the captions ("There are 3 shapes ..."). The planted
    # description lies that invent an object are made the same way, so the RM's pairs hold the
    # SFT's habit. False: the count stays the scene's (the text contradicts itself)
    shapes_habit_counted: bool = False


@dataclass
class OptimConfig:
    """Optimizer, schedule and checkpointing: what every training stage has."""

    lr: float = 1e-3  # peak learning rate (AdamW)
    schedule: str = "cosine"  # cosine | constant | wsd (constant, then cosine over the last decay_ratio)
    decay_ratio: float = 0.2  # wsd: share of the steps spent decaying
    warmup_ratio: float = 0.03  # linear warmup over this share of the optimizer steps
    warmup_steps: int = 0  # if > 0, overrides warmup_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)
    save_every: int = 50  # checkpoint every N steps (and at the last)
    keep_last: int = 2  # complete checkpoints kept
    max_nonfinite_skips: int = 5  # stop after this many consecutive non-finite steps (each is skipped)


@dataclass
class TrainLoopConfig(OptimConfig):
    """The supervised loop (SFT, RM): batches of examples, gradient accumulation, eval."""

    epochs: float = 1.0  # passes over the data
    max_steps: int = 0  # if > 0, overrides epochs
    batch_size: int = 8  # examples per forward pass and process
    grad_accum: int = 1  # forward passes per optimizer step (global batch = batch_size x grad_accum x processes)
    eval_every: int = 50  # held-out eval every N steps (0 = only at the end, where the stage has one; -1 = never)


@dataclass
class SFTConfig(TrainLoopConfig):
    mode: str = "full"  # full | qlora
    # The original recipe freezes the (pretrained) CLIP tower; so does the tiny preset, whose tower
    # is pretrained when its base is built (model.tiny.vision_pretrain_steps).
    train_vision_tower: bool = False


@dataclass
class RMConfig(TrainLoopConfig):
    # The base quantized to NF4: empty = <run.out_dir>/sft/final if it exists, else model.checkpoint
    base: str = ""
    fact_augmented: bool = True  # the RM prompt carries the image's captions (False = vanilla RM)
    eval_size: int = 500  # held-out pairs carved from the preference file when no eval file exists (recipe: 500)
    # train only on the pairs whose record's question_type is one of these (empty: all); the
    # held-out pairs stay all, so the per-type accuracy table still covers every type
    question_types: list = field(default_factory=list)
    mean_reward_penalty: float = 0.0  # coef x |mean(r_chosen + r_rejected)|: keeps rewards near 0 (recipe: 1e-3)
    # Coef x a language-model loss on the RM prompt after the *chosen* response (its facts and the
    # template's fixed text: mean cross-entropy per token), added to the Bradley–Terry loss. 0 = the
    # recipe's loss alone (RLHF/models/reward_model.py, RewardModelTrainer.compute_loss: BCE on
    # r_1 − r_0 + 1e-3·|mean reward|). A pretrained LLM reads a caption against the response before it;
    # the tiny decoder, trained from scratch on image questions, never had to, and its fact RM ignored
    # the object lines. Predicting each caption from the faithful response it follows teaches the
    # reward adapter that reading (README, session 17). A vanilla RM's suffix is the template alone
    facts_lm_coef: float = 0.0
    # How the scalar head is read (RM training, PPO and eval alike; written beside the adapter and
    # checked): last = at the last token (the recipe, RLHF/models/reward_model.py RewardModel.forward)
    # | mean = averaged over every real token | suffix = averaged over the RM prompt after the response
    # (facts + template), every position of which has seen the whole response (no preset's: README,
    # session 18 — the fact RM reads colours but stops checking the count, and PPO drops objects)
    score_pool: str = "last"
    # Coef x the log-likelihood of the RM prompt after the response (the facts, then the template's
    # closing words; summed over its tokens) under the reward adapter's language-model head, added to
    # the head's score in RM training, PPO and eval (written beside the adapter and checked). 0 = the
    # recipe's score, the head alone. With rm.facts_lm_coef the adapter learns to copy each caption
    # from a faithful response; after a response that contradicts a caption or leaves its object out
    # that caption is improbable, at its own tokens — a check of every fact, where the head at the last
    # token must route them all to one position (README, session 19). A vanilla RM's suffix is the
    # template's fixed words: nearly constant
    facts_logprob_coef: float = 0.0
    lr: float = 2e-5
    schedule: str = "constant"
    grad_clip: float = 0.3


@dataclass
class PPOConfig(OptimConfig):
    """One PPO step = a rollout of ``rollout_batch_size`` prompts, then ``ppo_epochs`` passes
    over it in minibatches of ``step_batch_size`` rows (one optimizer step each), so a PPO step
    makes ppo_epochs x rollout_batch_size / step_batch_size optimizer steps. ``rollout_chunk_size``
    (prompts generated at once) and ``batch_size`` (rows per scoring/training forward pass;
    gradients accumulate over a minibatch) only bound memory: they change no result."""

    base: str = ""  # as rm.base
    reward_adapter: str = ""  # empty = <run.out_dir>/rm/reward_adapter
    # RL-init (the recipe's policy start, RLHF/models/ppo_trainer.py:1015-1084): a PEFT adapter
    # directory (a qlora `factrl sft` run's sft/adapter, or a released one: adapter_model.bin +
    # adapter_config.json) trained on ppo.base. The policy starts as a trainable copy of it and the
    # reference is the base with it, frozen. Empty = the policy starts at the base (LoRA B = 0)
    # and the reference is the base alone. With it and ppo.base empty, the base is the adapter's
    # base_model_name_or_path (never sft/final: a qlora SFT merged its adapter into that one).
    init_adapter: str = ""
    # A second checkpoint for the reward and value roles (the recipe's 13B RM/value beside a 7B
    # policy, train_rl_model.sh --reward_base_model_name, --vision_tower different): its own NF4
    # base, CLIP tower and image size; the policy and reference stay on ppo.base. Its tokenizer
    # must equal the policy's (as the recipe, which reads both with the policy's). Empty = every
    # role on one base (the default).
    reward_base: str = ""
    fact_augmented: bool = True  # the RM prompt PPO builds (must match how the RM was trained)
    save_merged: bool = False  # also write a merged llava-hf checkpoint of the policy
    grouped_scoring: bool = True  # policy/reference/value rows in one pass over the base weights
    # batch sizes (see above)
    rollout_batch_size: int = 512
    rollout_chunk_size: int = 32
    step_batch_size: int = 256
    batch_size: int = 8
    # rollout
    ppo_epochs: int = 2  # passes over each rollout
    temperature: float = 1.0  # sampling temperature (log-probs are taken at the same temperature)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_response_len: int = 896  # response tokens sampled at most
    # reward shaping
    kl_coef: float = 0.1  # per-token penalty coefficient on KL(policy || reference)
    adaptive_kl: bool = False  # adapt kl_coef toward kl_target (Ziegler et al.)
    kl_target: float = 6.0  # adaptive KL: target sequence KL
    kl_horizon: int = 10000  # adaptive KL: horizon in rollout sequences
    kl_estimator: str = "k1_clamp"  # k1 | k1_clamp | k2 | k3
    no_eos_penalty: float = -8.0  # added to the reward of a response that never emitted EOS
    length_penalty: float = -10.0  # × len / max_response_len × length_bonus
    correct_bonus: float = 2.0  # × the correctness term of a prompt with a known answer (caption_type 2-7)
    # original: the recipe's symbolic reward (+1 right option; on "No" questions +0.5 "No", -0.5
    # "Yes"; nothing on "Yes" questions) | factrl: +1 for any right answer, "Yes" included
    correct_rule: str = "original"
    truncate_at_question: bool = True  # cut responses after their first "?" (then no EOS: penalized)
    reward_whiten: bool = False  # whiten RM scores over the rollout before shaping
    reward_scale: float = 10.0  # shaped rewards ×this before GAE when reward_whiten is off (the recipe's ×10)
    reward_clip: float = 0.0  # clip RM scores to ±reward_clip (0 = off)
    # rm | checker: the world's ground-truth checker replaces the RM score (+1 correct, -1
    # hallucinated, checker_vague otherwise; the embedded world only, through the world-aware
    # callers: make train, factrl pipeline). A diagnostic: what PPO does with a perfect reward.
    reward_source: str = "rm"
    question_types: list = field(default_factory=list)  # only the prompts of these question_types (empty: all)
    checker_vague: float = -0.5  # checker reward of an answer neither right nor false ("." included)
    # GAE + losses
    gamma: float = 1.0  # discount
    lam: float = 1.0  # GAE lambda
    whiten_advantages: bool = True  # whiten advantages over the valid response tokens
    whiten_over_padding: bool = False  # the recipe's whitening over every position, padding included
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # value loss weight
    entropy_coef: float = 0.0  # entropy bonus weight
    epochs: float = 1.0  # passes over the prompts when total_steps is 0
    total_steps: int = 0  # PPO steps (rollout + update); 0 = prompts x epochs / rollout_batch_size
    sample_every: int = 5  # log a table of sample responses every N steps
    # Score the policy on held-out sets every N PPO steps, at the last step and once before the
    # first (the SFT policy), 0 = off. Only when the caller passes an eval hook (train_ppo's
    # eval_fn: the trainer knows no eval sets); keys are logged as eval/<name>.
    eval_every: int = 0
    eval_items: int = 60  # items per held-out set the eval hook scores (greedy; fewer = faster)
    lr: float = 3e-5  # the schedule steps once per PPO step, as the recipe's (warmup too)
    warmup_steps: int = 5  # in PPO steps
    schedule: str = "cosine"
    grad_clip: float = 1.0


@dataclass
class PopeConfig:
    """POPE from its official question files (LLaVA-RLHF ``Eval/pope/coco_pope_<split>.jsonl``: one
    {"question_id", "image", "text", "label"} per line) over the images they name."""

    folder: str = ""  # the folder holding the question files
    file_pattern: str = "coco_pope_{split}.jsonl"  # a split's question file in folder
    splits: list[str] = field(default_factory=lambda: ["random", "popular", "adversarial"])
    image_folder: str = ""  # the images the files name (COCO val2014); empty = <folder>/images
    # Appended to each question (Eval/eval_scripts/eval_pope.sh --test-prompt)
    suffix: str = "\nAnswer the question using a single word or phrase."
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens (the original: 64, model_vqa.py --short_eval)


@dataclass
class MMHalConfig:
    """MMHal-Bench from its published json (``response_template.json``: question_type,
    question_topic, image_id, image_src, image_content, question, gt_answer) and images."""

    folder: str = ""  # the benchmark's folder
    file: str = "response_template.json"  # the questions, in folder
    image_folder: str = ""  # images named as image_src's file name; empty = <folder>/images
    suffix: str = ""  # appended to each question (Eval/eval_scripts/eval_mmhal.sh passes --test-prompt '')
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens (the original: 1024)
    # An already written responses file (records with model_answer) to judge instead of generating
    responses: str = ""


@dataclass
class JudgeConfig:
    """The MMHal judge: any OpenAI-compatible chat-completions endpoint."""

    base_url: str = ""  # e.g. https://api.openai.com/v1 (POSTs <base_url>/chat/completions); empty = no judge
    model: str = "gpt-4-0314"  # the original's judge (Eval/eval_scripts/eval_mmhal.sh)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (unset = no auth header)
    temperature: float = 0.0  # as eval_gpt_mmhal.py
    timeout_s: float = 120.0  # per request
    retries: int = 5  # on a failed request, then the eval stops with the error
    retry_wait_s: float = 10.0  # between retries (the original's)


@dataclass
class ChairConfig:
    """CHAIR over generated descriptions of COCO images, against their instance annotations."""

    annotations: str = ""  # instances_val2014.json (COCO instances format)
    # captions_val2014.json: the objects its captions name count as present too (the original's); empty = off
    captions: str = ""
    image_folder: str = ""  # the images (file_name of the annotations' images); empty = the annotations' folder
    # A file of image ids (a JSON list or one per line); empty = every image, capped by eval.max_items
    image_ids: str = ""
    prompt: str = "Please describe this image in detail."  # the description request
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens


@dataclass
class EvalConfig:
    # shapes: ShapesWorld's held-out sets (the embedded default) | pope | mmhal | chair: the published
    # benchmarks from the files configured below (factrl eval --benchmark NAME)
    benchmark: str = "shapes"
    # What PPO's eval hook scores every ppo.eval_every steps: shapes (ShapesWorld's MMHal + POPE
    # adversarial) | pope_random | pope_popular | pope_adversarial (that split of eval.pope's files)
    ppo_set: str = "shapes"
    max_new_tokens: int = 48  # greedy answer length
    batch_size: int = 16  # questions generated at once (and RM pairs scored at once)
    max_items: int = 0  # cap on each held-out set or benchmark split (0 = all)
    pope: PopeConfig = field(default_factory=PopeConfig)
    mmhal: MMHalConfig = field(default_factory=MMHalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    chair: ChairConfig = field(default_factory=ChairConfig)


@dataclass
class ExperimentConfig:
    """``factrl experiment``: one SFT, then a vanilla and a fact-augmented RM + PPO per seed."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # run.seed of each RM + PPO pair
    # Everything the experiment writes (it replaces run.out_dir): sft/, seed<s>/<arm>/, results
    out_dir: str = "runs/experiment"
    # The RMs judged on the policies' own samples (the held-out pairs are planted, the policy's are
    # not): per seed, this many held-out prompts (of ppo.question_types; ShapesWorld's MMHal-style and
    # CHAIR sets), rated_samples responses each at ppo.temperature from the SFT model and from each
    # arm's policy, rated by the world's checker into (faithful, hallucinated) pairs that both arms'
    # RMs score. 0 = skip
    rated_items: int = 100
    rated_samples: int = 8


@dataclass
class DeepSpeedConfig:
    """``run.distributed=deepspeed``: the DeepSpeed engine with ZeRO for SFT (full and qlora) and the
    RM (trainers/zero.py). The optimizer is factrl's AdamW (``torch_adam``) with the stage's lr,
    betas, weight decay, clipping and schedule; batch sizes and accumulation are the stage's."""

    # 2: Adam states and gradients partitioned over the processes; 3: the parameters too (full SFT
    # of 7B/13B; the original's SFT scripts use ZeRO-3). Quantized (NF4) bases: stage 2 only.
    zero_stage: int = 3
    offload_optimizer: str = "none"  # none | cpu: Adam states and fp32 master weights in host memory
    offload_param: str = "none"  # none | cpu: ZeRO-3 only, parameters in host memory between uses
    # bf16 weights with fp32 master weights in the optimizer: auto = model.dtype=bfloat16 on CUDA
    # and a dense base (an NF4 base keeps its fp32 absmax: its adapters train under autocast) | true | false
    bf16: str = "auto"
    # A DeepSpeed JSON whose sections (zero_optimization, bf16, ...) replace the fields above; the
    # batch sizes, accumulation, clipping and optimizer stay the stage's ("auto" or equal values accepted).
    config: str = ""


@dataclass
class RunConfig:
    out_dir: str = "runs/tiny"  # every stage writes under it (trainers.run.RunLayout)
    seed: int = 0  # data order, sampling and initialization
    device: str = "auto"  # auto | cpu | cuda
    resume: str = "none"  # none | auto | path to a checkpoint directory
    # A fresh run (resume=none) into a stage directory that holds another run's checkpoints or
    # metrics is refused unless this is true: then that stage's checkpoints, metrics and samples
    # are deleted first (the run owns its out_dir; nothing is deleted without being asked).
    overwrite: bool = False
    # Resume with optimization-changing values (lr, schedule, batch sizes, steps, model, data)
    # that differ from the checkpoint's config: refused with the list of differences unless this
    # is true; then the new values apply and the differences are logged (<stage>/resume.log).
    resume_override: bool = False
    progress: bool = True  # progress bars
    # Where metrics go besides metrics.jsonl: tensorboard | wandb | tensorboard,wandb | none. wandb is
    # an optional extra (pip install 'factrl[wandb]') and runs offline (WANDB_MODE=offline unless set).
    report_to: str = "tensorboard"
    wandb_project: str = "factrl"  # the wandb project a run logs to
    # Processes under torchrun (or the deepspeed launcher): ddp (factrl's all-reduce of what trains)
    # | deepspeed (ZeRO, run.deepspeed; SFT and RM, PPO stays on ddp: it trains adapters only).
    distributed: str = "ddp"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)


# ---- (de)serialization ------------------------------------------------------------------------


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_type(value, args[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-5' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _merge(obj: Any, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _check_type(v, hints[k], key))
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls=Config) -> Any:
    return _merge(cls(), data or {})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        _merge(cfg, nested)
    return cfg


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r} (known: {', '.join(known)}; or give a .yaml path)")
    return preset


def load_config(preset: str = "tiny", overrides: Optional[list[str]] = None, validate: bool = True) -> Config:
    """The preset (or YAML file) with ``overrides`` applied, every value validated (``validate``;
    off only to read back a saved config for comparison)."""
    path = resolve_preset(preset)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    cfg = apply_overrides(cfg, overrides or [])
    if validate:
        validate_config(cfg)
    return cfg


# ---- validation: every value checked at load, before any model or data work ------------------------

DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
LINEAR_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # model.llava.LINEAR_NAMES (not imported: no torch here)


def validate_config(cfg: Config) -> None:
    """Raise ConfigError listing every invalid value by its dotted key: ranges, enums and paths that
    must exist. Only limits the code needs (a batch of 0 rows divides by zero, a negative one
    trains on nothing); whether CUDA is present is checked when a stage starts (presets for GPUs
    load anywhere)."""
    bad: list[str] = []

    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            bad.append(f"'{key}' = {obj!r}: {what}")

    # every number finite (YAML reads .nan/.inf; an override 'nan' is a float)
    for key, v in _leaves(cfg):
        if isinstance(v, float):
            need(key, math.isfinite(v), "expected a finite number")
    r, m, d = cfg.run, cfg.model, cfg.data
    need("run.out_dir", r.out_dir.strip() != "", "expected a directory")
    need("run.device", DEVICE_RE.fullmatch(r.device) is not None, "expected auto | cpu | cuda | cuda:N | mps")
    if r.resume not in ("", "none", "auto"):
        need("run.resume", (Path(r.resume) / "COMPLETE").is_file(),
             "expected none | auto | a complete checkpoint directory (one with COMPLETE)")
    need("run.distributed", r.distributed in ("ddp", "deepspeed"), "expected ddp | deepspeed")
    ds = r.deepspeed
    need("run.deepspeed.zero_stage", ds.zero_stage in (2, 3), "expected 2 | 3")
    need("run.deepspeed.offload_optimizer", ds.offload_optimizer in ("none", "cpu"), "expected none | cpu")
    need("run.deepspeed.offload_param", ds.offload_param in ("none", "cpu"), "expected none | cpu")
    need("run.deepspeed.offload_param", ds.offload_param == "none" or ds.zero_stage == 3,
         "parameter offload needs run.deepspeed.zero_stage=3")
    need("run.deepspeed.bf16", ds.bf16 in ("auto", "true", "false"), "expected auto | true | false")
    if ds.config:
        need("run.deepspeed.config", Path(ds.config).is_file(), "no such DeepSpeed JSON file")
    if m.checkpoint:
        need("model.checkpoint", (Path(m.checkpoint) / "config.json").is_file(),
             "no such llava-hf checkpoint directory (no config.json there)")
    need("model.dtype", m.dtype in ("float32", "bfloat16", "float16"), "expected float32 | bfloat16 | float16")
    need("model.blocksize", m.blocksize > 0, "expected > 0")
    need("model.lora.r", m.lora.r > 0, "expected a rank > 0")
    need("model.lora.dropout", 0.0 <= m.lora.dropout < 1.0, "expected 0 <= dropout < 1")
    need("model.lora.targets", len(m.lora.targets) > 0 and set(m.lora.targets) <= set(LINEAR_TARGETS),
         f"expected a non-empty list of {', '.join(LINEAR_TARGETS)}")
    t = m.tiny
    for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
              "vision_hidden_size", "vision_layers", "vision_heads", "image_size", "patch_size",
              "max_position_embeddings"):
        need(f"model.tiny.{k}", getattr(t, k) > 0, "expected > 0")
    need("model.tiny.vision_pretrain_steps", t.vision_pretrain_steps >= 0, "expected >= 0")
    if t.num_heads > 0 and t.num_kv_heads > 0:
        need("model.tiny.hidden_size", t.hidden_size % t.num_heads == 0, "expected a multiple of num_heads")
        need("model.tiny.num_heads", t.num_heads % t.num_kv_heads == 0, "expected a multiple of num_kv_heads")
    if t.vision_heads > 0:
        need("model.tiny.vision_hidden_size", t.vision_hidden_size % t.vision_heads == 0,
             "expected a multiple of vision_heads")
    if t.patch_size > 0:
        need("model.tiny.image_size", t.image_size % t.patch_size == 0, "expected a multiple of patch_size")
    for k in ("image_folder", "sft_file", "preference_file", "captions_file", "ppo_prompts_file", "eval_dir"):
        need(f"data.{k}", getattr(d, k).strip() != "", "expected a file or folder name")
    need("data.shapes_habit", 0 <= cfg.data.shapes_habit <= 1, "expected 0 <= shapes_habit <= 1")
    need("data.shapes_habit_object", cfg.data.shapes_habit_object in ("absent", "present"),
         "expected absent | present")
    for k in ("max_seq_len", "max_prompt_len", "shapes_n", "shapes_image_size"):
        need(f"data.{k}", getattr(d, k) > 0, "expected > 0")
    need("data.image_aspect", d.image_aspect in ("pad", "resize", "crop"), "expected pad | resize | crop")
    for name in ("sft", "rm", "ppo"):
        _validate_optim(need, name, getattr(cfg, name))
    for name in ("sft", "rm"):
        lp = getattr(cfg, name)
        need(f"{name}.epochs", lp.epochs > 0, "expected > 0")
        need(f"{name}.max_steps", lp.max_steps >= 0, "expected >= 0 (0 = use epochs)")
        need(f"{name}.batch_size", lp.batch_size > 0, "expected > 0")
        need(f"{name}.grad_accum", lp.grad_accum > 0, "expected > 0")
        need(f"{name}.eval_every", lp.eval_every >= -1, "expected >= -1 (0 = only at the end, -1 = never)")
    need("sft.mode", cfg.sft.mode in ("full", "qlora"), "expected full | qlora")
    need("rm.eval_size", cfg.rm.eval_size > 0, "expected > 0")
    need("rm.mean_reward_penalty", cfg.rm.mean_reward_penalty >= 0, "expected >= 0")
    need("rm.facts_lm_coef", cfg.rm.facts_lm_coef >= 0, "expected >= 0")
    need("rm.facts_logprob_coef", cfg.rm.facts_logprob_coef >= 0, "expected >= 0")
    need("rm.score_pool", cfg.rm.score_pool in ("last", "mean", "suffix"), "expected last, mean or suffix")
    p = cfg.ppo
    # ppo.init_adapter / ppo.reward_base are checked when PPO starts: `factrl plan` takes them as
    # hypothetical paths or architecture names
    for k in ("base", "reward_adapter"):
        need(f"ppo.{k}", not getattr(p, k) or Path(getattr(p, k)).is_dir(), "no such directory")
    need("rm.base", not cfg.rm.base or Path(cfg.rm.base).is_dir(), "no such directory")
    for k in ("rollout_batch_size", "rollout_chunk_size", "step_batch_size", "batch_size", "ppo_epochs",
              "max_response_len", "kl_horizon", "eval_items"):
        need(f"ppo.{k}", getattr(p, k) > 0, "expected > 0")
    for k in ("top_k", "total_steps", "sample_every", "eval_every", "kl_coef", "reward_clip", "clip_range",
              "clip_range_value", "vf_coef", "entropy_coef"):
        need(f"ppo.{k}", getattr(p, k) >= 0, "expected >= 0")
    need("ppo.epochs", p.epochs > 0, "expected > 0")
    need("ppo.temperature", p.temperature > 0, "expected > 0")
    need("ppo.top_p", 0 < p.top_p <= 1, "expected 0 < top_p <= 1")
    need("ppo.kl_target", p.kl_target > 0, "expected > 0")
    need("ppo.kl_estimator", p.kl_estimator in ("k1", "k1_clamp", "k2", "k3"), "expected k1 | k1_clamp | k2 | k3")
    need("ppo.correct_rule", p.correct_rule in ("original", "factrl"), "expected original | factrl")
    need("ppo.reward_source", p.reward_source in ("rm", "checker"), "expected rm | checker")
    need("ppo.reward_scale", p.reward_scale > 0, "expected > 0")
    need("ppo.gamma", 0 <= p.gamma <= 1, "expected 0 <= gamma <= 1")
    need("ppo.lam", 0 <= p.lam <= 1, "expected 0 <= lam <= 1")
    e = cfg.eval
    need("eval.max_new_tokens", e.max_new_tokens > 0, "expected > 0")
    need("eval.batch_size", e.batch_size > 0, "expected > 0")
    need("eval.max_items", e.max_items >= 0, "expected >= 0 (0 = all)")
    need("eval.benchmark", e.benchmark in ("shapes", "pope", "mmhal", "chair"),
         "expected shapes | pope | mmhal | chair")
    need("eval.ppo_set", e.ppo_set in ("shapes", "pope_random", "pope_popular", "pope_adversarial"),
         "expected shapes | pope_random | pope_popular | pope_adversarial")
    backends = {b.strip() for b in r.report_to.split(",") if b.strip()}
    need("run.report_to", bool(backends) and backends <= {"tensorboard", "wandb", "none"},
         "expected tensorboard | wandb | tensorboard,wandb | none")
    x = cfg.experiment
    need("experiment.seeds", len(x.seeds) > 0 and len(set(x.seeds)) == len(x.seeds), "expected distinct seeds")
    need("experiment.out_dir", x.out_dir.strip() != "", "expected a directory")
    if bad:
        raise ConfigError("invalid config value" + ("s" if len(bad) > 1 else "") + ":\n  " + "\n  ".join(bad))


def _validate_optim(need, name: str, o: OptimConfig) -> None:
    need(f"{name}.lr", o.lr >= 0, "expected a learning rate >= 0")
    need(f"{name}.schedule", o.schedule in ("cosine", "constant", "wsd"), "expected cosine | constant | wsd")
    need(f"{name}.decay_ratio", 0 < o.decay_ratio <= 1, "expected 0 < decay_ratio <= 1")
    need(f"{name}.warmup_ratio", 0 <= o.warmup_ratio <= 1, "expected 0 <= warmup_ratio <= 1")
    need(f"{name}.warmup_steps", o.warmup_steps >= 0, "expected >= 0")
    need(f"{name}.weight_decay", o.weight_decay >= 0, "expected >= 0")
    need(f"{name}.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "expected two numbers in [0, 1)")
    need(f"{name}.grad_clip", o.grad_clip >= 0, "expected >= 0 (0 = no clipping)")
    need(f"{name}.save_every", o.save_every > 0, "expected > 0")
    need(f"{name}.keep_last", o.keep_last >= 0, "expected >= 0 (0 = keep all)")
    need(f"{name}.max_nonfinite_skips", o.max_nonfinite_skips > 0, "expected > 0")


def _leaves(obj: Any, prefix: str = ""):
    """(dotted key, value) of every field, lists' items included."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, key + ".")
        elif isinstance(v, list):
            yield from ((f"{key}", x) for x in v)
        else:
            yield key, v


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through ``model.io.atomic_dir``: a killed writer never leaves half a file."""
    from factrl.model.io import atomic_dir

    with atomic_dir(path, directory=False) as tmp:
        tmp.write_text(text)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
