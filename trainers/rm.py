"""The fact-augmented reward model (``factrl rm``, ``make train-rm``).

The SFT checkpoint, quantized to NF4, carries a ``reward`` LoRA adapter and a scalar head read
at the last token of the RM prompt: conversation + response + (with ``fact_augmented``) the
image's captions / multiple-choice truth, ending at "...the quality score of my last response
is"; with ``rm.facts_logprob_coef`` (not the recipe's) the score adds the log-likelihood of that RM
prompt after the response under the adapter's own language-model head (``Reading``). Loss:
Bradley–Terry, BCE-with-logits on r(chosen) − r(rejected), plus an optional small penalty keeping
the mean reward near 0 and (``rm.facts_lm_coef``, not the recipe's) a language-model loss on the
chosen row's RM prompt: its facts predicted from the response before them. Output:
``<out>/rm/reward_adapter`` in PEFT format with the head beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from factrl.trainers.config import Config
from factrl.trainers.data import (
    collate_preferences,
    load_captions,
    load_preferences,
    other_scenes_captions,
    select_question_types,
)
from factrl.trainers.loop import supervised_loop
from factrl.trainers.metrics import rm_accuracy
from factrl.trainers.run import autocast
from factrl.trainers.setup import load_assets, stage_base, to_device
from factrl.trainers.stage import Stage, trainable_adapter

ROLE = "reward"


def last_token_scores(model, head: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head at each row's last real token (right padding): ``[B]`` fp32."""
    last = attention_mask.long().sum(-1) - 1  # (B,)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return model.head(head, h[:, None]).squeeze(-1)


def mean_token_scores(model, head: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head at every real token, averaged over the row's real tokens: ``[B]`` fp32."""
    m = attention_mask.float()
    return (model.head(head, hidden) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def suffix_mask(attention_mask: torch.Tensor, suffix_len: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: each row's last ``suffix_len`` ``[B]`` real tokens (right padding) — the RM
    prompt after the response (``rm.score_pool=suffix``, ``suffix_logprobs``)."""
    n = attention_mask.long().sum(-1, keepdim=True)  # (B, 1) real tokens
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]
    return (t >= n - suffix_len.to(n.device)[:, None]) & (t < n)


def suffix_token_scores(model, head: str, hidden: torch.Tensor, attention_mask: torch.Tensor,
                        suffix_len: torch.Tensor) -> torch.Tensor:
    """Scalar head averaged over each row's last ``suffix_len`` real tokens: the RM prompt after the
    response, every position of which sees the whole response: ``[B]`` fp32."""
    m = suffix_mask(attention_mask, suffix_len).float()
    return (model.head(head, hidden) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


POOLS = {"last": last_token_scores, "mean": mean_token_scores, "suffix": suffix_token_scores}
SCORE_FILE = "reward_score.json"  # beside the reward adapter: how its score is read


def sequence_scores(model, head: str, hidden, attention_mask, pool: str = "last", suffix_len=None) -> torch.Tensor:
    """The head's score ``[B]`` of each row, read as ``rm.score_pool`` says: ``last`` = the head at the
    last token (the recipe, RLHF/models/reward_model.py RewardModel.forward; the presets'), ``mean`` =
    the head averaged over every real token (most of which precede the captions and cannot see them),
    ``suffix`` = averaged over each row's last ``suffix_len`` ``[B]`` tokens, the RM prompt after the
    response, each of which has seen the whole response. Measured on the tiny preset (README, session
    18): ``suffix`` lets the fact RM compare a caption with the response at the caption's own tokens
    (a wrong colour caught 0.78-0.91 vs 0.48-0.76 read last), but it stops checking the stated count
    against the captions and PPO with it drops objects: the preset reads the last token."""
    if pool not in POOLS:
        raise ValueError(f"rm.score_pool={pool!r}: expected one of {', '.join(POOLS)}")
    if pool == "suffix":
        _need_suffix(suffix_len, "rm.score_pool=suffix")
        return suffix_token_scores(model, head, hidden, attention_mask, suffix_len)
    return POOLS[pool](model, head, hidden, attention_mask)


def _need_suffix(suffix_len, what: str) -> None:
    if suffix_len is None or bool((suffix_len <= 0).any()):  # 0 would read nothing: a score of 0
        raise ValueError(f"{what} needs each row's RM-prompt length (suffix_len > 0)")


@dataclass(frozen=True)
class Reading:
    """How an RM's score is read from its forward pass: the head (``pool``, rm.score_pool) plus
    ``facts_coef`` (rm.facts_logprob_coef) x the log-likelihood of the RM prompt after the response
    (the facts, then the template's closing words) given everything before it, under the reward
    adapter's own language-model head. RM training, PPO and eval read one way; the adapter keeps it."""

    pool: str = "last"
    facts_coef: float = 0.0

    @classmethod
    def of(cls, rm) -> "Reading":
        return cls(rm.score_pool, rm.facts_logprob_coef)

    @property
    def needs_suffix(self) -> bool:
        """Whether each row's RM-prompt length (``suffix_len``) must be passed."""
        return self.pool == "suffix" or self.facts_coef > 0


def rm_scores(model, head: str, hidden, input_ids, attention_mask, reading: Reading, suffix_len=None,
              facts_logprob=None) -> torch.Tensor:
    """The RM score ``[B]`` fp32 of each row (right padding): the head read as ``reading.pool`` says,
    plus ``reading.facts_coef`` x sum of log p(token | before) over each row's last ``suffix_len`` ``[B]``
    tokens (``facts_logprob`` ``[B]``: that sum, when the caller has it already). Not the recipe's (its
    score is the head alone): a model that can copy a caption from the response before it
    (rm.facts_lm_coef teaches the tiny one to) finds the facts improbable after a response that states
    something they contradict or leaves out what they state — a reading of every caption token at
    once, not routed to one last position (README, session 19)."""
    r = sequence_scores(model, head, hidden, attention_mask, reading.pool, suffix_len)
    if reading.facts_coef > 0:
        _need_suffix(suffix_len, "rm.facts_logprob_coef > 0")
        if facts_logprob is None:
            facts_logprob = suffix_logprobs(model, hidden, input_ids, attention_mask, suffix_len)[0]
        r = r + reading.facts_coef * facts_logprob
    return r


def save_reading(adapter_dir, reading: Reading) -> None:
    from factrl.trainers.config import write_atomic

    write_atomic(Path(adapter_dir) / SCORE_FILE,
                 json.dumps({"score_pool": reading.pool, "facts_logprob_coef": reading.facts_coef}) + "\n")


def check_reading(adapter_dir, reading: Reading) -> None:
    """Refuse to read a reward adapter's score another way than it was trained (a file written by
    ``factrl rm``; adapters from elsewhere, e.g. the original's, have none and are read as configured)."""
    f = Path(adapter_dir) / SCORE_FILE
    if f.is_file():
        d = json.loads(f.read_text())
        trained = Reading(d.get("score_pool", "last"), float(d.get("facts_logprob_coef", 0.0)))
        if trained != reading:
            raise ValueError(f"{adapter_dir}: this reward model was trained with rm.score_pool={trained.pool} "
                             f"rm.facts_logprob_coef={trained.facts_coef}, the config says "
                             f"rm.score_pool={reading.pool} rm.facts_logprob_coef={reading.facts_coef}; set them so")


def pair_rewards(model, b: dict, reading: Reading = Reading(), with_facts_lm: bool = False):
    """(r_chosen, r_rejected) ``[B]``: both responses in one ``[2B, T]`` pass, image features once;
    ``with_facts_lm``: also the chosen rows' ``suffix_lm_loss`` ``[B]`` (rm.facts_lm_coef), from the
    same log-probs the score reads when it reads them (the LM head runs once per suffix token)."""
    ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
    mask = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]])
    feats = None
    if b.get("pixel_values") is not None:
        f = model.encode_images(b["pixel_values"])  # (n_img, P, H) — rows with an image, in order
        feats = torch.cat([f, f])
    with model.adapter(ROLE):
        h = model(ids, mask, image_features=feats)
    sfx = torch.cat([b["chosen_suffix_len"], b["rejected_suffix_len"]])
    B = b["chosen_input_ids"].shape[0]
    lp = None
    if reading.facts_coef > 0:  # both rows' facts are part of the score
        lp = suffix_logprobs(model, h, ids, mask, sfx)
    elif with_facts_lm:  # the LM term's rows only
        lp = suffix_logprobs(model, h[:B], ids[:B], mask[:B], sfx[:B])
    r = rm_scores(model, ROLE, h, ids, mask, reading, sfx, None if lp is None else lp[0])
    if not with_facts_lm:
        return r[:B], r[B:]
    return r[:B], r[B:], suffix_lm_loss((lp[0][:B], lp[1][:B]))


def suffix_logprobs(model, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    suffix_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token | before), number of tokens), each ``[B]`` fp32, over each row's last
    ``suffix_len`` real tokens (right padding; token 0 has no predictor). hidden ``[B, T, H]``,
    input_ids/attention_mask ``[B, T]``, suffix_len ``[B]``. The LM head runs on the predicting
    positions only (never ``[B, T, vocab]``)."""
    target = suffix_mask(attention_mask, suffix_len)[:, 1:]  # (B, T-1)
    logits = model.logits(hidden[:, :-1][target]).float()  # (N, V): position t-1 predicts token t
    lp = -F.cross_entropy(logits, input_ids[:, 1:][target], reduction="none")  # (N,)
    rows = target.nonzero()[:, 0]
    total = torch.zeros(input_ids.shape[0], device=lp.device).index_add(0, rows, lp)
    return total, target.sum(-1).float()


def suffix_lm_loss(logprobs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's suffix, from ``suffix_logprobs``' (sum, count):
    ``[B]`` fp32, 0 for a row without any (rm.facts_lm_coef's term)."""
    total, n = logprobs
    return -total / n.clamp(min=1)


def load_pairs(cfg: Config, a, fact_augmented: bool, held_only: bool = False,
               with_held: bool = True, other_scenes: bool = False) -> tuple[list, list]:
    """(train, held-out) pairs as RM inputs. Held-out: ``data.preference_eval_file`` when it exists
    (not read without ``with_held``), else ``rm.eval_size`` pairs carved from the preference file
    by a permutation seeded with run.seed, as RLHF/data_utils/data_utils_rm.py:255-271
    (random_split, the run's seed). ``other_scenes``: each image's facts are another image's
    (data.other_scenes_captions), the probe of whether a fact RM reads them."""
    root = a.data_root
    captions = load_captions(root / cfg.data.captions_file) if fact_augmented else None
    if captions is not None and other_scenes:
        captions = other_scenes_captions(captions)
    load = lambda f: load_preferences(  # noqa: E731
        root / f, a.tokenizer, a.num_image_tokens, cfg.data.max_seq_len, captions, fact_augmented,
        template=cfg.data.fact_template, skip_bad=cfg.data.skip_bad_records,
        image_folder=str(root / cfg.data.image_folder), system=cfg.data.system_prompt, seed=cfg.run.seed,
        shuffle_captions=cfg.data.shuffle_captions)
    if cfg.data.preference_eval_file and (root / cfg.data.preference_eval_file).is_file():
        return ([] if held_only else load(cfg.data.preference_file)), \
            (load(cfg.data.preference_eval_file) if with_held else [])
    pairs = load(cfg.data.preference_file)
    n = cfg.rm.eval_size
    if not 0 < n < len(pairs):
        raise ValueError(f"{root / cfg.data.preference_file}: {len(pairs)} pairs, cannot hold out rm.eval_size={n} "
                         f"(and no {cfg.data.preference_eval_file or 'data.preference_eval_file'} in {root})")
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
    print(f"[factrl] rm: held out {n} of {len(pairs)} pairs of {cfg.data.preference_file} (seed {cfg.run.seed})")
    return [pairs[i] for i in perm[:-n]], [pairs[i] for i in perm[-n:]]


@torch.no_grad()
def score_pairs(model, pairs, batch_size: int, pad_id: int, images, device,
                reading: Reading = Reading()) -> list[tuple]:
    """(r_chosen, r_rejected, hallucination flag) for every pair (in the order given), in eval mode.
    Batched by length, so a batch pads little (~20% fewer tokens on ShapesWorld's held-out pairs)."""
    was = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
    out: list = [None] * len(pairs)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ex = [pairs[i] for i in idx]
        rc, rr = pair_rewards(model, to_device(collate_preferences(ex, pad_id, images), device), reading)
        for i, c, r in zip(idx, rc, rr):
            out[i] = (float(c), float(r), pairs[i].hallucination)
    model.train(was)
    return out


def evaluate_pairs(model, pairs, batch_size: int, pad_id: int, images, device, reading: Reading = Reading()) -> dict:
    """Accuracy overall and on hallucination-flagged pairs, mean reward (log keys)."""
    triples = score_pairs(model, pairs, batch_size, pad_id, images, device, reading)
    acc = rm_accuracy(triples)
    hal = acc["accuracy_hallucination"]
    return {"eval/acc": acc["accuracy"], "eval/acc_hallucination": float("nan") if hal is None else hal,
            "eval/n_hallucination": acc["n_hallucination"],
            "eval/mean_reward": sum(c + r for c, r, _ in triples) / (2 * len(triples))}


def train_rm(cfg: Config) -> dict:
    # 1. the stage: device, seed, processes, config saved
    stage = Stage(cfg, "rm")
    device = stage.device

    # 2. the SFT checkpoint as an NF4 base, a reward adapter and head (all that trains)
    a = load_assets(cfg, stage_base(cfg, stage.layout, cfg.rm.base), quantize=cfg.model.quantize, device=device)
    model, tok = a.model, a.tokenizer
    model.requires_grad_(False)
    params = trainable_adapter(model, ROLE, cfg.model.lora, head=True)

    # 3. preference pairs, rendered as RM prompts (fact-augmented or vanilla)
    fact = cfg.rm.fact_augmented
    scored = cfg.rm.eval_every >= 0  # -1: never scored here, so the held-out file is not even read
    train, held = load_pairs(cfg, a, fact, with_held=scored)
    # only these question types trained on (rm.question_types); the held-out pairs stay all of them
    train = select_question_types(train, a.data_root / cfg.data.preference_file, cfg.rm.question_types,
                                  "rm.question_types")
    print(f"[factrl] rm ({'fact-augmented' if fact else 'vanilla'}): {len(train)} train pairs, "
          + (f"{len(held)} held-out" if scored else "no held-out scoring (rm.eval_every=-1)"))

    # 4. Bradley–Terry loss over the global batch of pairs
    def make_batch(idx):
        return to_device(collate_preferences([train[i] for i in idx], tok.pad_token_id, a.images), device)

    def count(b):
        return float(b["chosen_input_ids"].shape[0])

    lm_coef = cfg.rm.facts_lm_coef
    reading = Reading.of(cfg.rm)

    def loss_fn(b, norm):
        with autocast(device, cfg.model.dtype):
            rc, rr, *lm = pair_rewards(model, b, reading, with_facts_lm=lm_coef > 0)
            lm = lm[0] if lm else None
        loss = F.binary_cross_entropy_with_logits(rc - rr, torch.ones_like(rc), reduction="sum")
        if cfg.rm.mean_reward_penalty > 0:
            # the original's |mean(r_0 + r_1)| x coef (RLHF/models/reward_model.py:315), per micro-batch
            loss = loss + cfg.rm.mean_reward_penalty * (rc + rr).sum().abs()
        logs = {"acc": float((rc > rr).float().sum()) / norm}
        if lm is not None:  # rm.facts_lm_coef: the facts read against the chosen response (a departure)
            loss = loss + lm_coef * lm.sum()
            logs["facts_lm"] = float(lm.detach().sum()) / norm
        return loss / norm, logs

    def eval_fn(step):
        return evaluate_pairs(model, held, cfg.eval.batch_size, tok.pad_token_id, a.images, device, reading)

    metrics = supervised_loop(stage, cfg.rm, model, params, len(train), make_batch, count, loss_fn,
                              eval_fn if scored else None,
                              plot_keys=("loss", "acc", "eval/acc", "eval/acc_hallucination"))

    # 5. the reward adapter + head in PEFT format
    from factrl.model.io import save_adapter

    out = stage.layout.reward_adapter
    if stage.rank == 0:  # one writer; the others wait for it
        save_adapter(model, ROLE, out, base_path=str(a.base), heads=(ROLE,))
        save_reading(out, reading)
    stage.barrier()
    return {"stage": "rm", "fact_augmented": fact, "adapter": str(out), **metrics}
