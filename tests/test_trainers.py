"""SFT/RM trainers: resume that really resumes, atomic checkpoints, NaN guard, DDP equivalence."""

import json
import math
import os
import queue
import re
import socket
import time

import pytest
import torch
from micro import MICRO_MODEL

from factrl.trainers.checkpoint import Checkpoints
from factrl.trainers.config import from_dict, load_config, save_config, to_dict
from factrl.trainers.logs import read_metrics
from factrl.trainers.stage import NonFiniteError

MICRO = [*MICRO_MODEL, "data.shapes_n=40",
         "sft.batch_size=4", "sft.max_steps=6", "sft.save_every=3", "sft.lr=3e-3",
         "rm.batch_size=4", "rm.max_steps=4", "rm.save_every=2", "rm.eval_every=2", "rm.lr=1e-3",
         "eval.batch_size=8"]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """One ShapesWorld dataset + tiny base for the module (each run gets its own out_dir)."""
    from factrl.trainers.embedded import prepare

    root = tmp_path_factory.mktemp("shared")
    prepare(load_config("tiny", MICRO + [f"run.out_dir={root}", f"data.root={root}/data"]))
    return root


def give_base(shared, out):
    """``out``/tiny_base, copied from the module's. Multi-process tests call it in the parent: two
    workers copying it at once raced (one got FileExistsError and left the other waiting forever
    for its rendezvous; stop 27's CI failure)."""
    import shutil

    os.makedirs(out, exist_ok=True)
    if not os.path.exists(f"{out}/tiny_base"):
        shutil.copytree(f"{shared}/tiny_base", f"{out}/tiny_base")


def micro_cfg(shared, out, *extra):
    give_base(shared, out)
    return load_config("tiny", MICRO + [f"run.out_dir={out}", f"data.root={shared}/data", *extra])


def losses(out, stage):
    return [r["loss"] for r in read_metrics(out / stage / "metrics.jsonl")]


def grad_norms(out, stage="sft"):
    return [r["grad_norm"] for r in read_metrics(out / stage / "metrics.jsonl")]


def test_config_roundtrip_and_unknown_keys(tmp_path):
    from factrl.trainers.config import ConfigError

    cfg = load_config("llava-v1.5-7b", ["ppo.kl_coef=0.05", "model.lora.targets=[q,v]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert again.ppo.kl_coef == 0.05 and again.model.lora.targets == ["q", "v"]
    with pytest.raises(ConfigError, match="'ppo.kl_coeff'"):
        load_config("tiny", ["ppo.kl_coeff=1"])
    with pytest.raises(ConfigError, match="'model.lora.r'.*integer"):
        load_config("tiny", ["model.lora.r=abc"])
    with pytest.raises(ConfigError, match="'sft.nope'"):
        from_dict({"sft": {"nope": 1}})


def test_lr_schedules_hand_worked():
    from factrl.trainers.stage import lr_lambda

    f = lr_lambda("wsd", warmup=2, total=10, decay_ratio=0.2)  # decay over steps 8..10
    assert [round(f(s), 6) for s in range(11)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0]
    g = lr_lambda("cosine", warmup=2, total=10)  # cosine over steps 2..10
    assert [round(g(s), 6) for s in (0, 1, 2, 6, 10)] == [0.5, 1, 1, 0.5, 0]
    assert lr_lambda("constant", warmup=0, total=10)(9) == 1
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_lambda("linear", 0, 10)
    with pytest.raises(ValueError, match="decay_ratio"):
        lr_lambda("wsd", 0, 10, decay_ratio=0)


def test_sft_resume_gives_identical_losses(shared_data, tmp_path, monkeypatch):
    from factrl.trainers.sft import train_sft

    straight = tmp_path / "straight"
    train_sft(micro_cfg(shared_data, straight))
    ref = losses(straight, "sft")
    assert len(ref) == 6 and ref[-1] < ref[0]

    # Kill the second run right after its step-3 checkpoint, then resume=auto.
    killed = tmp_path / "killed"
    orig = Checkpoints.save

    def save_then_die(self, step, state, cfg):
        p = orig(self, step, state, cfg)
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return p

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(micro_cfg(shared_data, killed))
    monkeypatch.setattr(Checkpoints, "save", orig)
    assert len(losses(killed, "sft")) == 3
    train_sft(micro_cfg(shared_data, killed, "run.resume=auto"))
    assert losses(killed, "sft") == ref  # bit-identical on CPU
    # the SFT output is a llava-hf checkpoint that transformers loads
    from transformers import LlavaForConditionalGeneration

    final = LlavaForConditionalGeneration.from_pretrained(str(killed / "sft" / "final"))
    # full SFT trains the decoder and projector; the (pretrained) CLIP tower stays frozen, as in the recipe
    base = LlavaForConditionalGeneration.from_pretrained(str(killed / "tiny_base"))
    tower = lambda m: m.model.vision_tower.state_dict()  # noqa: E731
    assert all(torch.equal(v, tower(base)[k]) for k, v in tower(final).items())
    assert not torch.equal(final.model.multi_modal_projector.linear_1.weight,
                           base.model.multi_modal_projector.linear_1.weight)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = load_config("tiny")
    ck = Checkpoints(tmp_path / "ck", keep=2)
    ck.save(1, {"x": torch.ones(3)}, cfg)

    def torn_write(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full / killed mid-write")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError):
        ck.save(2, {"x": torch.zeros(3)}, cfg)
    assert ck.latest().name == "step-00000001"  # the torn step-2 is invisible to resume
    assert torch.equal(Checkpoints.load(ck.latest())["x"], torch.ones(3))
    monkeypatch.undo()
    for s in (2, 3, 4):
        ck.save(s, {"x": torch.full((3,), float(s))}, cfg)
    assert [p.name for p in ck.complete()] == ["step-00000003", "step-00000004"]  # keep_last=2


def test_nan_step_is_skipped_and_weights_untouched(shared_data, tmp_path, monkeypatch):
    import factrl.trainers.sft as sft
    from factrl.trainers import stage

    real = sft.token_logprobs
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 2 else out  # step 2's loss is NaN

    monkeypatch.setattr(sft, "token_logprobs", poisoned)
    snapshots = []
    orig_step = stage.StepGuard.step

    def spy(self, loss, params, *a, **k):
        before = [p.detach().clone() for p in params]
        r = orig_step(self, loss, params, *a, **k)
        snapshots.append((r, all(torch.equal(b, p) for b, p in zip(before, params))))
        return r

    monkeypatch.setattr(stage.StepGuard, "step", spy)
    out = tmp_path / "nan"
    res = sft.train_sft(micro_cfg(shared_data, out, "sft.max_steps=4"))
    assert res["skipped"] == 1
    assert snapshots[1] == (None, True)  # skipped, no weight changed
    assert snapshots[0][1] is False and snapshots[2][1] is False  # finite steps do update
    rows = read_metrics(out / "sft" / "metrics.jsonl")
    assert rows[1]["grad_norm"] is None and rows[1]["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in torch.load(out / "sft" / "checkpoints" / "step-00000004" / "state.pt",
                                                           weights_only=False)["model"].values())

    calls["n"] = -10**9  # now every step is NaN → stops after max_nonfinite_skips
    monkeypatch.setattr(sft, "token_logprobs", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        sft.train_sft(micro_cfg(shared_data, tmp_path / "nan2", "sft.max_nonfinite_skips=3"))


# Wall-clock bound for one two-process run (both ranks reporting): generous, CI machines are slower
RUN_TWO_DEADLINE_S = 900


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _ddp_worker(rank, world, port, shared, out, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from factrl.trainers.sft import train_sft

    try:
        train_sft(micro_cfg(shared, out, "sft.batch_size=2", "sft.grad_accum=1", "sft.max_steps=3"))
        q.put((rank, "ok"))
    except BaseException as e:  # anything (SystemExit too): report to the parent instead of hanging it
        q.put((rank, repr(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_rank_fails_worker(rank, world, port, shared, out, q):
    if rank == 0:
        q.put((0, "ValueError('rank 0 broke')"))
    else:
        time.sleep(RUN_TWO_DEADLINE_S)  # as a rank waiting for rank 0 in a rendezvous


@pytest.mark.multiprocess
def test_two_process_harness_fails_fast_when_a_rank_fails(shared_data, tmp_path):
    """Stop 27's CI: rank 0 failed (a race copying the base) and the harness waited 300 s on rank 1,
    which waited for rank 0 forever, then raised a bare queue.Empty. Now the failure ends the run."""
    t = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"rank 0 failed.*rank 0 broke"):
        _spawn_two(_one_rank_fails_worker, shared_data, tmp_path / "x", (), "harness")
    assert time.monotonic() - t < 120
    assert (tmp_path / "x" / "tiny_base").is_dir()  # copied by the parent, before the workers start


@pytest.mark.multiprocess
def test_ddp_two_processes_equal_one_process(shared_data, tmp_path):
    from factrl.trainers.sft import train_sft

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: kernels' reduction order depends on the thread count
    try:
        train_sft(micro_cfg(shared_data, one, "sft.batch_size=2", "sft.grad_accum=2", "sft.max_steps=3"))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    results = _spawn_two(_ddp_worker, shared_data, two, (), "ddp sft")
    assert results == {0: "ok", 1: "ok"}, results
    a, b = losses(one, "sft"), losses(two, "sft")
    assert len(a) == len(b) == 3
    # Step 1 (before any update) differs only in fp32 rounding of the summed loss. Later steps see
    # last-bit gradient differences between processes (CPU kernels' reduction order), which Adam
    # amplifies: measured 2.2e-5 relative at step 3. A DDP without the gradient all-reduce is off
    # by 5.7e-3 already at step 2 (measured), so 2e-4 separates right from broken by 25x.
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(b, a, rtol=2e-4, atol=0)
    # The losses alone cannot see gradients off by a constant factor: grad clipping (active here)
    # and Adam are both blind to the scale. The grad norm is not: each process' loss is already its
    # share of the global mean, so averaging the all-reduced gradients would halve it (measured:
    # ratio 0.500 before the fix). Step 1's norm is of identical gradients up to fp32 summation order.
    g1, g2 = (torch.tensor(grad_norms(o), dtype=torch.float64) for o in (one, two))
    torch.testing.assert_close(g2[0], g1[0], rtol=1e-5, atol=0)


def test_rm_trains_evaluates_and_exports_peft(shared_data, tmp_path, monkeypatch):
    from factrl.trainers.rm import train_rm
    from factrl.trainers.sft import train_sft

    out = tmp_path / "rm"
    train_sft(micro_cfg(shared_data, out, "sft.max_steps=2"))
    res = train_rm(micro_cfg(shared_data, out))
    rows = read_metrics(out / "rm" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval/acc" in rows[1] and 0.0 <= rows[1]["eval/acc"] <= 1.0
    assert res["fact_augmented"] is True
    cfg = json.loads((out / "rm" / "reward_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and (out / "rm" / "reward_adapter" / "heads.safetensors").is_file()
    assert (out / "rm" / "config.yaml").is_file()
    assert "facts_lm" in rows[0]  # the tiny preset's rm.facts_lm_coef (1.0)
    # rm.facts_lm_coef: the LM term on the chosen row's facts is logged and falls over 8 steps; at 0
    # it is not computed (the recipe's loss alone)
    for coef in (1.0, 0.0):
        lm = tmp_path / f"lm{coef}"
        # with the term, the score also reads the facts' log-likelihood (rm.facts_logprob_coef), as kept
        train_rm(micro_cfg(shared_data, lm, "rm.max_steps=8", f"rm.facts_lm_coef={coef}", "rm.eval_every=0",
                           f"rm.facts_logprob_coef={coef / 2}", f"rm.base={out}/sft/final"))
        fl = [r.get("facts_lm") for r in read_metrics(lm / "rm" / "metrics.jsonl")]
        assert json.loads((lm / "rm" / "reward_adapter" / "reward_score.json").read_text()) == \
            {"score_pool": "last", "facts_logprob_coef": coef / 2}
        if coef:
            assert len(fl) == 8 and all(math.isfinite(v) and v > 0 for v in fl) and fl[-1] < fl[0]
        else:
            assert fl == [None] * 8
    # vanilla RM trains too (replacing the first RM's results: asked for)
    res2 = train_rm(micro_cfg(shared_data, out, "rm.fact_augmented=false", "rm.max_steps=2", "run.overwrite=true"))
    assert res2["fact_augmented"] is False
    # eval_every 0 scores the held-out pairs once, after the last step (in the result); -1 never
    for every, want in ((-1, False), (0, True)):
        o = tmp_path / f"rm_eval{every}"
        res_e = train_rm(micro_cfg(shared_data, o, "rm.max_steps=2", f"rm.eval_every={every}",
                                   f"rm.base={out}/sft/final"))
        rows = read_metrics(o / "rm" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and not any("eval/acc" in r for r in rows)
        assert ("eval/acc" in res_e) is want
    # rm.question_types: trained on those pairs only (each batch drawn from them), held-out all types
    seen = []
    import factrl.trainers.rm as R

    real = R.collate_preferences
    monkeypatch.setattr(R, "collate_preferences", lambda ex, *a: seen.extend(e.id for e in ex) or real(ex, *a))
    train_rm(micro_cfg(shared_data, tmp_path / "holistic", "rm.max_steps=2", "rm.question_types=[holistic]",
                       f"rm.base={out}/sft/final", "rm.eval_every=-1"))
    types = {r["id"]: r["question_type"] for r in json.loads((shared_data / "data" / "preference.json").read_text())}
    assert seen and {types[i] for i in seen} == {"holistic"}


def test_sft_qlora_writes_peft_adapter_and_merged_checkpoint(shared_data, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from factrl.model.io import load_adapter, load_llava
    from factrl.trainers.sft import train_sft

    out = tmp_path / "qlora"
    res = train_sft(micro_cfg(shared_data, out, "sft.mode=qlora", "sft.max_steps=3",
                              "model.gradient_checkpointing=true"))
    assert res["steps"] == 3 and all(isinstance(r["loss"], float) for r in read_metrics(out / "sft" / "metrics.jsonl"))
    adapter, merged = out / "sft" / "adapter", out / "sft" / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the merged checkpoint == the NF4 base with the adapter active (up to the merge's fp32 rounding)
    tok_ids = torch.tensor([[1, 5, 9, 12, 7]])
    m = load_llava(merged).eval()
    q = load_llava(out / "tiny_base", quantize=True).eval()
    load_adapter(q, adapter, "sft")
    with torch.no_grad(), q.adapter("sft"):
        # the merged dense weights are the dequantized NF4 base + B·A·s
        torch.testing.assert_close(m(tok_ids), q(tok_ids), rtol=1e-4, atol=1e-4)
    # transformers + peft read both outputs
    LlavaForConditionalGeneration.from_pretrained(str(merged))
    PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(str(out / "tiny_base")), str(adapter))


def test_rm_scores_pairs_batched_by_length_in_the_order_given(monkeypatch):
    """score_pairs batches pairs of similar length together; each score must still land on its pair."""
    from factrl.trainers import rm as R
    from factrl.trainers.data import PreferenceExample

    seen = []

    def fake_rewards(model, b, pool="last"):  # reward = the row's number of real tokens (+ 0.5 for the chosen side)
        seen.append(b["chosen_input_ids"].shape)
        return b["chosen_attention_mask"].sum(-1).float() + 0.5, b["rejected_attention_mask"].sum(-1).float()

    monkeypatch.setattr(R, "pair_rewards", fake_rewards)
    lens = [9, 2, 7, 2, 9, 4, 1]
    pairs = [PreferenceExample([5] * n, [6] * (n - 1 or 1), None, bool(i % 2), str(i)) for i, n in enumerate(lens)]
    out = R.score_pairs(torch.nn.Linear(1, 1), pairs, 3, 0, None, "cpu")
    assert out == [(n + 0.5, max(n - 1, 1), bool(i % 2)) for i, n in enumerate(lens)]
    assert [s[1] for s in seen] == [2, 9, 9]  # sorted batches of 1,2,2 | 4,7,9 | 9 tokens (in order: 9,7,9)


def test_rm_score_pools_hand_worked_and_the_adapter_remembers_its_pool(tmp_path):
    """rm.score_pool: ``last`` reads the head at the last real token (right padding), ``mean``
    averages it over the real tokens, ``suffix`` over the last suffix_len real tokens; a reward adapter
    trained one way is refused read the other."""
    from factrl.trainers import rm as R

    class Head:  # head(name, hidden) = hidden[..., 0], as a scalar head with weight e_0 and no bias
        def head(self, name, hidden):
            return hidden[..., 0].float()

    h = torch.tensor([[1.0, 2.0, 6.0, 100.0], [3.0, 5.0, 7.0, 9.0]])[..., None]  # (B=2, T=4, H=1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert R.sequence_scores(Head(), "reward", h, mask, "last").tolist() == [6.0, 9.0]
    assert R.sequence_scores(Head(), "reward", h, mask, "mean").tolist() == [3.0, 6.0]  # padding (100) unread
    # suffix: averaged over each row's last suffix_len real tokens (the RM prompt after the response)
    sfx = torch.tensor([2, 3])
    assert R.sequence_scores(Head(), "reward", h, mask, "suffix", sfx).tolist() == [4.0, 7.0]
    with pytest.raises(ValueError, match="suffix_len"):
        R.sequence_scores(Head(), "reward", h, mask, "suffix")
    with pytest.raises(ValueError, match="suffix_len > 0"):  # a row without an RM prompt would score 0
        R.sequence_scores(Head(), "reward", h, mask, "suffix", torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="score_pool"):
        R.sequence_scores(Head(), "reward", h, mask, "max")
    R.save_reading(tmp_path, R.Reading("mean"))
    R.check_reading(tmp_path, R.Reading("mean"))
    with pytest.raises(ValueError, match="trained with rm.score_pool=mean rm.facts_logprob_coef=0.0"):
        R.check_reading(tmp_path, R.Reading("last"))
    with pytest.raises(ValueError, match="trained with rm.score_pool=mean"):
        R.check_reading(tmp_path, R.Reading("mean", 0.5))
    R.check_reading(tmp_path / "elsewhere", R.Reading("last"))  # an adapter without the file: read as configured
    (tmp_path / R.SCORE_FILE).write_text('{"score_pool": "suffix"}')  # written before facts_logprob_coef: 0
    R.check_reading(tmp_path, R.Reading("suffix"))


def test_suffix_lm_loss_hand_worked():
    """rm.facts_lm_coef's term: the mean cross-entropy of each row's last ``suffix_len`` real tokens, each
    predicted from the position before it; padding and the tokens before the suffix are not targets."""
    import math

    from factrl.trainers import rm as R

    class LM:  # logits(h) = h: the hidden state *is* the next-token logit vector (vocab 3)
        def logits(self, hidden):
            return hidden

    lg = math.log
    # row 0: 4 real tokens + 1 pad, suffix 2 -> targets ids[2] (from h[1]) and ids[3] (from h[2])
    # row 1: 5 real tokens, suffix 1 -> target ids[4] (from h[3]); row 2: suffix 0 -> no target, loss 0
    ids = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 2], [1, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    h = torch.zeros(3, 5, 3)
    h[0, 1] = torch.tensor([0.0, 0.0, lg(2.0)])  # p(2) = 2/4 -> CE log 2
    h[0, 2] = torch.tensor([lg(3.0), 0.0, 0.0])  # p(1) = 1/5 -> CE log 5
    h[0, 3] = torch.tensor([9.0, -9.0, -9.0])  # predicts the pad: never a target
    h[1, 3] = torch.tensor([0.0, 0.0, lg(7.0)])  # p(2) = 7/9 -> CE log 9/7
    h[1, 0] = torch.tensor([-9.0, -9.0, 9.0])  # before the suffix: not read
    got = R.suffix_lm_loss(R.suffix_logprobs(LM(), h, ids, mask, torch.tensor([2, 1, 0])))
    torch.testing.assert_close(got, torch.tensor([(lg(2) + lg(5)) / 2, lg(9 / 7), 0.0]))
    # a suffix as long as the row: token 0 has no predictor, so targets start at 1
    whole = R.suffix_lm_loss(R.suffix_logprobs(LM(), torch.zeros(1, 3, 3), ids[:1, :3], mask[:1, :3],
                                               torch.tensor([3])))
    torch.testing.assert_close(whole, torch.tensor([lg(3.0)]))
    # rm.facts_logprob_coef reads the same tokens as a score: the head (last token) + coef x the suffix's
    # summed log-probability; a reading that needs the lengths refuses to run without them

    class HeadLM(LM):
        def head(self, name, hidden):
            return hidden[..., 0].float()

    got = R.rm_scores(HeadLM(), "reward", h, ids, mask, R.Reading("last", 0.5), torch.tensor([2, 1, 1]))
    h_last = torch.tensor([h[0, 3, 0], h[1, 4, 0], h[2, 4, 0]])
    want = h_last + 0.5 * torch.tensor([-(lg(2) + lg(5)), -lg(9 / 7), -lg(3.0)])  # row 2: uniform p(1) = 1/3
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(R.rm_scores(HeadLM(), "reward", h, ids, mask, R.Reading()), h_last)
    with pytest.raises(ValueError, match="facts_logprob_coef > 0 needs"):
        R.rm_scores(HeadLM(), "reward", h, ids, mask, R.Reading("last", 0.5))


# ---- DeepSpeed ZeRO (run.distributed=deepspeed), two gloo processes on CPU ------------------------------
ZERO_STEPS = ["sft.max_steps=4", "sft.save_every=2"]
# 1 process x 2 micro-batches of 2 == 2 processes x DeepSpeed's own accumulation of 2 micro-batches of 1
ONE_PROC = ["sft.batch_size=2", "sft.grad_accum=2"]
TWO_PROC = ["sft.batch_size=1", "sft.grad_accum=2", "run.distributed=deepspeed"]


def _zero_worker(rank, world, port, shared, out, q, extra, kill_after, stage="sft", poison=()):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from factrl.trainers.rm import train_rm
    from factrl.trainers.sft import train_sft

    if poison and rank == 0:  # these calls of rank 0's log-prob kernel (its micro-batches) return NaN
        import factrl.trainers.sft as sft

        real, calls = sft.token_logprobs, [0]

        def poisoned(*a, **k):
            calls[0] += 1
            out = real(*a, **k)
            return out * float("nan") if calls[0] in poison else out

        sft.token_logprobs = poisoned
    if kill_after:  # every process dies right after the collective checkpoint of that step
        orig = Checkpoints.save_engine

        def save_then_die(self, step, *a, **k):
            p = orig(self, step, *a, **k)
            if step == kill_after:
                raise KeyboardInterrupt("simulated kill")
            return p

        Checkpoints.save_engine = save_then_die
    try:
        if stage == "sft":
            train_sft(micro_cfg(shared, out, *ZERO_STEPS, *TWO_PROC, *extra))
        else:
            train_rm(micro_cfg(shared, out, "run.distributed=deepspeed", *extra))
        q.put((rank, "ok"))
    except KeyboardInterrupt:
        q.put((rank, "killed"))
    except BaseException as e:  # anything else (SystemExit too): report to the parent instead of hanging it
        import traceback

        q.put((rank, repr(e) + traceback.format_exc()[-2000:]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_two(shared, out, extra, kill_after=0, stage="sft", poison=()):
    args = (list(extra), kill_after, stage, tuple(poison))
    return _spawn_two(_zero_worker, shared, out, args, f"{stage} ({' '.join(extra)}, kill_after={kill_after})")


def _spawn_two(worker, shared, out, args, what):
    """``worker(rank, 2, port, shared, out, q, *args)`` in two spawned processes; {rank: outcome}.

    The results are read before joining (a worker whose queued message is unread may not exit). A
    rank that fails, dies without reporting, or runs past the deadline ends the run at once (the
    other rank would wait for it in a collective forever), named with what it reported and the
    exit codes, not as a bare queue.Empty after minutes (stop 27's CI)."""
    import torch.multiprocessing as mp

    give_base(shared, out)  # before the workers start: each would copy it, and they race
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, str(shared), str(out), q, *args)) for r in range(2)]
    for p in procs:
        p.start()
    start, results = time.monotonic(), {}

    def fail(why):
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        pytest.fail(f"two-process {what}: {why} after {time.monotonic() - start:.0f} s; "
                    f"results {results}, exit codes {codes}")

    try:
        while len(results) < len(procs):
            try:
                rank, outcome = q.get(timeout=2)
                results[rank] = outcome
                if outcome not in ("ok", "killed"):
                    fail(f"rank {rank} failed")
                continue
            except queue.Empty:
                pass
            if any(r not in results and not p.is_alive() for r, p in enumerate(procs)):
                try:  # its message may still be in the pipe
                    rank, outcome = q.get(timeout=10)
                    results[rank] = outcome
                    continue
                except queue.Empty:
                    fail("a worker exited without reporting")
            if time.monotonic() - start > RUN_TWO_DEADLINE_S:
                fail(f"no result within the {RUN_TWO_DEADLINE_S} s deadline")
    finally:
        for p in procs:
            p.join(timeout=30 if len(results) == len(procs) else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    return results


@pytest.fixture(scope="module")
def one_process_reference(shared_data, tmp_path_factory):
    """Plain single-process SFT with the ZeRO tests' global batch: losses and grad norms."""
    from factrl.trainers.sft import train_sft

    out = tmp_path_factory.mktemp("zero_ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: kernels' reduction order depends on the thread count
    try:
        train_sft(micro_cfg(shared_data, out, *ZERO_STEPS, *ONE_PROC))
    finally:
        torch.set_num_threads(threads)
    return losses(out, "sft"), grad_norms(out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_equal_one_process(shared_data, one_process_reference, tmp_path, stage):
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'factrl[deepspeed]'")
    out = tmp_path / f"zero{stage}"
    # ZeRO-3 with gradient checkpointing, as the 7B/13B presets (recomputation changes no number)
    ckpt = ["model.gradient_checkpointing=true"] if stage == 3 else []
    results = _run_two(shared_data, out, [f"run.deepspeed.zero_stage={stage}", *ckpt])
    assert results == {0: "ok", 1: "ok"}, results
    ref_loss, ref_norm = (torch.tensor(v, dtype=torch.float64) for v in one_process_reference)
    got_loss = torch.tensor(losses(out, "sft"), dtype=torch.float64)
    got_norm = torch.tensor(grad_norms(out), dtype=torch.float64)
    assert len(got_loss) == len(ref_loss) == 4
    # As the DDP test: step 1 differs only in fp32 rounding of the summed loss (and here of micro-
    # batches of 1 row instead of 2: padding changes no real token's sum), later steps by last-bit
    # gradient differences that Adam amplifies. A ZeRO run whose loss DeepSpeed averaged over the
    # processes (no x world) or divided by the accumulation count has half or a quarter the gradient:
    # its grad norm is off by 2x or 4x at step 1, far outside 1e-5. Measured (2 cores, DeepSpeed
    # 0.19.8): losses within 9.5e-7 absolute (1.5e-7 relative) of one process over 4 steps, grad
    # norms within 7.9e-8 relative; the bounds are the DDP test's, whose runs differ by up to 2.2e-5.
    rel_norm = ((got_norm - ref_norm) / ref_norm).abs().max()
    print(f"ZeRO-{stage}: losses 1 proc {ref_loss.tolist()}, 2 procs {got_loss.tolist()}, max |diff| "
          f"{(got_loss - ref_loss).abs().max():.3g}; grad norm max rel diff {rel_norm:.3g}")
    torch.testing.assert_close(got_loss[0], ref_loss[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got_loss, ref_loss, rtol=2e-4, atol=0)
    torch.testing.assert_close(got_norm[0], ref_norm[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got_norm, ref_norm, rtol=2e-4, atol=0)
    ck = Checkpoints(out / "sft" / "checkpoints").latest()
    assert ck.name == "step-00000004" and (ck / "engine").is_dir() and (ck / "COMPLETE").is_file()


@pytest.mark.multiprocess
def test_zero3_resume_after_kill_and_export_loads_in_transformers(shared_data, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'factrl[deepspeed]'")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import LlavaForConditionalGeneration

    from factrl.model.io import load_llava

    z3 = ["run.deepspeed.zero_stage=3"]
    straight = tmp_path / "straight"
    assert _run_two(shared_data, straight, z3) == {0: "ok", 1: "ok"}
    killed = tmp_path / "killed"
    assert _run_two(shared_data, killed, z3, kill_after=2) == {0: "killed", 1: "killed"}
    assert len(losses(killed, "sft")) == 2 and not (killed / "sft" / "final").exists()
    assert _run_two(shared_data, killed, [*z3, "run.resume=auto"]) == {0: "ok", 1: "ok"}
    # the engine reloads the fp32 partitions, Adam states and schedule exactly; the data position
    # and RNG come back from its client state: the same losses, bit for bit
    assert losses(killed, "sft") == losses(straight, "sft")

    # The export (gathered from the ZeRO-3 partitions by factrl) against DeepSpeed's own
    # consolidation of the last checkpoint (zero_to_fp32) loaded into factrl's model: same logits.
    final = killed / "sft" / "final"
    hf = LlavaForConditionalGeneration.from_pretrained(str(final)).eval()
    ours = load_llava(killed / "tiny_base").eval()
    sd = get_fp32_state_dict_from_zero_checkpoint(str(killed / "sft" / "checkpoints" / "step-00000004"), tag="engine")
    missing, unexpected = ours.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.startswith("vision.") for k in missing)  # the frozen tower is not trained
    ids = torch.tensor([[i for i in (1, 5, 9, 12, 7, 3, 20) if i != ours.image_token_id][:6]])  # text only
    with torch.no_grad():
        want = ours.logits(ours(ids))
        got = hf(input_ids=ids).logits
    print(f"ZeRO-3 export: max |logit diff| transformers vs zero_to_fp32 weights {(got - want).abs().max():.3g}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 both; only the attention kernels differ


def test_deepspeed_is_optional_and_its_absence_is_explained(monkeypatch):
    """Only trainers/zero.py imports deepspeed, inside functions a stage calls when it selects it;
    without it installed the error says how to install it."""
    import pathlib
    import sys

    from factrl.trainers import zero
    from factrl.trainers.config import ConfigError

    root = pathlib.Path(__file__).parents[1]
    files = [p for d in ("kernels", "model", "trainers") for p in (root / d).rglob("*.py")]
    importers = sorted(str(p.relative_to(root)) for p in files
                       if re.search(r"^\s*(import|from) deepspeed", p.read_text(), re.M))
    assert importers == ["trainers/zero.py"]
    assert not re.search(r"^(import|from) deepspeed", (root / "trainers/zero.py").read_text(), re.M)  # not at top
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'factrl\[deepspeed\]'"):
        zero.import_deepspeed()


def test_deepspeed_config_follows_the_stage_and_refuses_conflicts(tmp_path):
    from factrl.trainers import zero
    from factrl.trainers.config import ConfigError

    cfg = load_config("tiny", ["run.distributed=deepspeed", "run.deepspeed.zero_stage=2", "sft.batch_size=3",
                               "sft.grad_accum=5", "sft.grad_clip=0.5", "run.deepspeed.offload_optimizer=cpu"])
    c = zero.ds_config(cfg, cfg.sft, world=4, quantized=False)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (3, 5, 60)
    assert c["gradient_clipping"] == 0.5 and c["optimizer"]["params"]["torch_adam"] is True
    assert c["zero_optimization"]["stage"] == 2 and c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    j = tmp_path / "ds.json"
    j.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto", "gradient_clipping": 1.0}))
    cfg = load_config("tiny", [f"run.deepspeed.config={j}", "sft.grad_clip=0.5"])
    with pytest.raises(ConfigError, match="gradient_clipping"):
        zero.ds_config(cfg, cfg.sft, world=2, quantized=False)
    j.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    assert zero.ds_config(cfg, cfg.sft, world=2, quantized=False)["zero_optimization"] == {"stage": 3}
    with pytest.raises(ConfigError, match="zero_stage=2"):  # an NF4 base cannot be partitioned
        zero.ds_config(cfg, cfg.sft, world=2, quantized=True)
    with pytest.raises(ConfigError, match="offload_param"):
        load_config("tiny", ["run.deepspeed.zero_stage=2", "run.deepspeed.offload_param=cpu"])


@pytest.mark.multiprocess
def test_zero2_rm_two_processes_equal_one_process(shared_data, tmp_path):
    """The RM (an NF4 base, the reward adapter and head train) on ZeRO-2, as SFT's test."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'factrl[deepspeed]'")
    from factrl.trainers.rm import train_rm

    rm = lambda out: ["rm.max_steps=3", "rm.eval_every=-1", f"rm.base={out}/tiny_base"]  # noqa: E731
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_rm(micro_cfg(shared_data, one, *rm(one), "rm.batch_size=2", "rm.grad_accum=2"))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    extra = [*rm(two), "rm.batch_size=1", "rm.grad_accum=2", "run.deepspeed.zero_stage=2"]
    assert _run_two(shared_data, two, extra, stage="rm") == {0: "ok", 1: "ok"}
    a, b = (torch.tensor(losses(o, "rm"), dtype=torch.float64) for o in (one, two))
    ga, gb = (torch.tensor(grad_norms(o, "rm"), dtype=torch.float64) for o in (one, two))
    print(f"RM ZeRO-2: losses 1 proc {a.tolist()}, 2 procs {b.tolist()}; grad norms {ga.tolist()} / {gb.tolist()}")
    torch.testing.assert_close(b, a, rtol=2e-4, atol=0)  # tolerances as the SFT tests'
    torch.testing.assert_close(gb[0], ga[0], rtol=1e-5, atol=0)
    assert (two / "rm" / "reward_adapter" / "adapter_config.json").is_file()


@pytest.mark.multiprocess
def test_zero2_nonfinite_step_is_skipped_and_counted(shared_data, tmp_path):
    """Step 2's loss is NaN on rank 0 only (its micro-batches 3 and 4): ZeRO skips the update (the
    NaN reaches every process through the gradient reduction), the guard counts it, and the later
    steps train on finite weights."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'factrl[deepspeed]'")
    out = tmp_path / "nan"
    assert _run_two(shared_data, out, ["run.deepspeed.zero_stage=2"], poison=(3, 4)) == {0: "ok", 1: "ok"}
    rows = read_metrics(out / "sft" / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["grad_norm"] is None and rows[0]["grad_norm"] is not None
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in (rows[2], rows[3]))


@pytest.mark.multiprocess
def test_zero2_qlora_sft_two_processes_equal_one_process(shared_data, tmp_path):
    """qlora SFT (an NF4 base, the LoRA adapter trains) on ZeRO-2, as the full SFT test."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed: pip install 'factrl[deepspeed]'")
    from factrl.trainers.sft import train_sft

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_sft(micro_cfg(shared_data, one, *ZERO_STEPS, *ONE_PROC, "sft.mode=qlora"))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    assert _run_two(shared_data, two, ["sft.mode=qlora", "run.deepspeed.zero_stage=2"]) == {0: "ok", 1: "ok"}
    a, b = (torch.tensor(losses(o, "sft"), dtype=torch.float64) for o in (one, two))
    ga, gb = (torch.tensor(grad_norms(o), dtype=torch.float64) for o in (one, two))
    print(f"qlora ZeRO-2: losses 1 proc {a.tolist()}, 2 procs {b.tolist()}, max |diff| {(b - a).abs().max():.3g}")
    torch.testing.assert_close(b, a, rtol=2e-4, atol=0)  # tolerances as the full SFT test's
    torch.testing.assert_close(gb[0], ga[0], rtol=1e-5, atol=0)
    assert (two / "sft" / "adapter" / "adapter_config.json").is_file() and (two / "sft" / "final").is_dir()
