"""The recipe's PPO configuration: an RL-init policy/reference (ppo.init_adapter) and reward +
value on a second NF4 base with its own tower (ppo.reward_base), on two tiny bases of different
sizes built here. Adapters are random (B ≠ 0), so every role differs from the bare base."""

import pytest
import torch
from micro import MICRO_MODEL

# the policy base: the shared micro model, 48 px / 16 px patches = 9 image tokens
POLICY = [*MICRO_MODEL, "model.tiny.vision_pretrain_steps=0", "data.shapes_n=48",
          "data.shuffle_captions=true"]  # the recipe's caption shuffle, which the RM score below reproduces
# the reward base: wider and deeper, its own tower (wider, one layer) at 32 px / 8 px = 16 image tokens
REWARD_TINY = dict(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=96,
                   vision_hidden_size=48, vision_layers=1, vision_heads=2, image_size=32, patch_size=8)
PPO = ["ppo.rollout_batch_size=6", "ppo.rollout_chunk_size=3", "ppo.step_batch_size=3", "ppo.batch_size=3",
       "ppo.max_response_len=5", "ppo.total_steps=2", "ppo.save_every=1", "ppo.warmup_steps=0", "ppo.lr=1e-2",
       "ppo.sample_every=0"]


def _random_adapter(model, name, path, head=None):
    from factrl.model.io import save_adapter

    model.add_adapter(name, r=4, alpha=8.0)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.normal_(0, 0.1)
        if head:
            model.add_head(head, zero_init=False)
    save_adapter(model, name, path, base_path="", heads=(head,) if head else ())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Data + the policy base (A), the reward base (B: same tokenizer, other sizes and tower), a
    reward adapter + head on each, an RL-init adapter on A."""
    from factrl.model.io import load_llava
    from factrl.model.tiny import build_tiny_checkpoint
    from factrl.trainers.config import TinyModelConfig, load_config
    from factrl.trainers.embedded import prepare, vocabulary_corpus

    root = tmp_path_factory.mktemp("two")
    cfg = load_config("tiny", POLICY + [f"run.out_dir={root}", f"data.root={root}/data"])
    prepare(cfg)
    b = build_tiny_checkpoint(root / "reward_base", TinyModelConfig(**REWARD_TINY),
                              vocabulary_corpus(cfg, root / "data"), seed=5)
    a = root / "tiny_base"
    torch.manual_seed(1)
    _random_adapter(load_llava(a, quantize=True), "reward", root / "rm_a", head="reward")
    _random_adapter(load_llava(b, quantize=True), "reward", root / "rm_b", head="reward")
    _random_adapter(load_llava(a, quantize=True), "sft", root / "rl_init")
    return root


def _cfg(root, two: bool, *extra):
    from factrl.trainers.config import load_config

    paths = [f"run.out_dir={root}/out", f"data.root={root}/data", f"ppo.base={root}/tiny_base",
             f"ppo.init_adapter={root}/rl_init"]
    paths += [f"ppo.reward_base={root}/reward_base", f"ppo.reward_adapter={root}/rm_b"] if two else \
        [f"ppo.reward_adapter={root}/rm_a"]
    return load_config("tiny", POLICY + PPO + paths + list(extra))


def _base_bytes(model):
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".adapters." not in n) + \
        sum(p.numel() * p.element_size() for n, p in model.named_parameters()
            if ".adapters." not in n and not n.startswith("heads."))


@pytest.mark.parametrize("two,pool,coef", [(False, "last", 0), (True, "last", 0), (False, "suffix", 0),
                                           (True, "last", 0.5)],
                         ids=["one-base", "two-bases", "one-base-suffix-pool", "two-bases-facts-logprob"])
def test_rl_init_reference_reward_base_and_gradients(bases, two, pool, coef):
    from factrl.model.io import load_adapter, load_llava
    from factrl.trainers import ppo as P
    from factrl.trainers.data import build_rm_input, load_captions, load_ppo_prompts, pad, pad_mask
    from factrl.trainers.rm import sequence_scores
    from factrl.trainers.run import resolve_device
    from factrl.trainers.setup import load_assets
    from factrl.trainers.stage import Stage

    cfg = _cfg(bases, two, "data.fact_template=factrl", f"rm.score_pool={pool}", f"rm.facts_logprob_coef={coef}")
    dev = resolve_device("cpu")
    a = load_assets(cfg, bases / "tiny_base", quantize=True, device=dev)
    model, tok = a.model, a.tokenizer
    reward = P.load_reward_base(cfg, tok, dev) if two else None
    rmodel = model if reward is None else reward.model
    before = [_base_bytes(model)] + ([_base_bytes(rmodel)] if two else [])
    params = P.build_roles(model, cfg, cfg.ppo.reward_adapter, None if reward is None else reward.model)
    # each base is held once: roles add adapters and heads, never a base tensor
    assert [_base_bytes(model)] + ([_base_bytes(rmodel)] if two else []) == before
    if two:
        assert set(model.adapter_state.names) == {"reference", "policy"} and not model.heads
        assert set(rmodel.adapter_state.names) == {"reward", "value"} and set(rmodel.heads) == {"reward", "value"}
        assert rmodel.text_config.hidden_size == 48 != model.text_config.hidden_size
    else:
        assert set(model.adapter_state.names) == {"reference", "policy", "reward", "value"}

    caps = load_captions(a.data_root / cfg.data.captions_file)
    prompts = load_ppo_prompts(a.data_root / cfg.data.ppo_prompts_file, tok, a.num_image_tokens, 200, caps)[:6]
    ro = P.rollout(model, tok, prompts, a.images, cfg, dev, torch.Generator().manual_seed(0), reward=reward)
    import random

    random.seed(7)
    rm = P.score(model, tok, ro, prompts, cfg, dev, reward)

    # the reference is the base + the RL-init adapter, exactly (a separately loaded copy)
    ref_model = load_llava(bases / "tiny_base", quantize=True).eval()
    load_adapter(ref_model, bases / "rl_init", "x", trainable=False)
    b = ro.select(list(range(6)))
    with torch.no_grad(), ref_model.adapter("x"):
        want = P.response_logprobs(ref_model, ref_model(b.input_ids, b.attention_mask,
                                                        image_features=b.image_features), b, 1.0)
    assert torch.equal(ro.ref_logprobs, want)
    with torch.no_grad(), ref_model.adapter(None):
        bare = P.response_logprobs(ref_model, ref_model(b.input_ids, b.attention_mask,
                                                        image_features=b.image_features), b, 1.0)
    assert not torch.allclose(want, bare)  # the adapter matters: the reference is not the bare base
    assert torch.equal(ro.old_logprobs, ro.ref_logprobs)  # the policy starts as a copy of it

    # the reward role reads the second base: the RM score of a separate copy of B + the RM adapter,
    # on B's view of the rows (16 image tokens and B's tower features)
    rm_base, rm_dir = (bases / "reward_base", bases / "rm_b") if two else (bases / "tiny_base", bases / "rm_a")
    judge = load_llava(rm_base, quantize=True).eval()
    load_adapter(judge, rm_dir, "reward", trainable=False)
    n_img = 16 if two else 9
    if two:
        v = ro.reward_view
        assert v.image_features.shape[1] == 16 and ro.image_features.shape[1] == 9
        assert ((v.input_ids == model.image_token_id).sum(1) == 16 * (v.image_rows >= 0)).all()
        with torch.no_grad():
            px = torch.stack([reward.images(p.image) for p in prompts])
            assert torch.equal(v.image_features, judge.encode_images(px))  # B's own tower and resolution
    from factrl.trainers import rm_prompt

    random.seed(7)
    template = rm_prompt.load_template(cfg.data.fact_template, True)
    img = tok.convert_tokens_to_ids("<image>")
    rm_ids, sfx = [], []
    for j, p in enumerate(prompts):
        response = ro.response[j, :int(ro.lengths[j])].tolist()
        query = [t for t in P.expand_images(p.query_ids, img, n_img) if t != tok.pad_token_id]
        rm_ids.append(build_rm_input(tok, query, response, rm_prompt.render(template, p.captions, random)))
        sfx.append(len(rm_ids[-1]) - len(query) - len(response))  # the RM prompt after the response
    feats = (ro.reward_view if two else ro).image_features
    want_rm = []
    for i in range(0, 6, cfg.ppo.batch_size):  # batched (and so padded) as score batches them
        part = rm_ids[i:i + cfg.ppo.batch_size]
        ids, mask = pad(part, tok.pad_token_id), pad_mask(part)
        with torch.no_grad(), judge.adapter("reward"):
            h = judge(ids, mask, image_features=feats[i:i + cfg.ppo.batch_size])
        score = sequence_scores(judge, "reward", h, mask, pool, torch.tensor(sfx[i:i + cfg.ppo.batch_size]))
        for r, (row, n) in enumerate(zip(part, sfx[i:i + cfg.ppo.batch_size])):  # rm.facts_logprob_coef:
            # + coef x log p of the RM prompt's tokens, each from the position before it (unpadded row)
            lp = torch.log_softmax(judge.logits(h[r, len(row) - n - 1:len(row) - 1]).float(), -1)
            score[r] += coef * lp.gather(1, torch.tensor(row[len(row) - n:])[:, None]).sum()
        want_rm.append(score)
    # exact, but for the order of a fp32 sum of ~100 log-probs (|score| ~ 400 with random adapters)
    torch.testing.assert_close(rm, torch.cat(want_rm), rtol=0 if coef == 0 else 1e-6, atol=0)

    # one update: gradients reach the policy adapter (policy base), value adapter and head (reward base) only
    ro.advantages = torch.randn_like(ro.old_logprobs) * ro.response_mask
    ro.returns = torch.randn_like(ro.values) * ro.response_mask
    trained = model if not two else torch.nn.ModuleDict({"p": model, "r": rmodel})
    stage = Stage(cfg, "ppo")
    stage.train(trained, params, cfg.ppo, 10)
    seen = {}
    for n, p in trained.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, n=n: seen.__setitem__(n, float(g.abs().sum())))
    frozen = [p for p in trained.parameters() if not p.requires_grad]
    P.ppo_update(model, ro, stage, cfg, torch.Generator().manual_seed(0), reward)
    got = {n for n, v in seen.items() if v > 0}
    assert all(p.grad is None for p in frozen)
    pre = ("p.", "r.") if two else ("", "")
    allowed = {n for n, _ in trained.named_parameters()
               if (n.startswith(pre[0]) and ".adapters.policy." in n)
               or (n.startswith(pre[1]) and (".adapters.value." in n or n.startswith(pre[1] + "heads.value.")))}
    assert got and got <= allowed
    assert any(".adapters.policy." in n for n in got) and any(".adapters.value." in n for n in got)
    assert pre[1] + "heads.value.weight" in got


def test_two_base_ppo_runs_saves_and_resumes(bases):
    from factrl.model.io import load_adapter, load_llava, load_tokenizer
    from factrl.model.tiny import build_tiny_checkpoint
    from factrl.trainers import ppo as P
    from factrl.trainers.config import TinyModelConfig
    from factrl.trainers.logs import read_metrics

    out = P.train_ppo(_cfg(bases, True, f"run.out_dir={bases}/run"))
    rows = read_metrics(bases / "run" / "ppo" / "metrics.jsonl")
    assert out["steps"] == 2 and len(rows) == 2 and all(abs(r["reward"]) < 1e6 for r in rows)
    # the value adapter is the reward base's (width 48); the policy adapter the policy base's (32)
    value = load_llava(bases / "reward_base")
    load_adapter(value, bases / "run" / "ppo" / "value_adapter", "value")
    assert "value" in value.heads and value.heads["value"].weight.shape == (1, 48)
    policy = load_llava(bases / "tiny_base")
    load_adapter(policy, bases / "run" / "ppo" / "policy_adapter", "policy")
    # resume from the step-1 checkpoint: both bases' trainables come back, the same step 2
    P.train_ppo(_cfg(bases, True, f"run.out_dir={bases}/run", "run.resume="
                     + str(bases / "run" / "ppo" / "checkpoints" / "step-00000001")))
    again = read_metrics(bases / "run" / "ppo" / "metrics.jsonl")
    keys = ("reward", "policy_loss", "value_loss")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]
    # factrl eval: the policy on the policy base, the RM scored on its own (second) base
    from factrl.trainers.eval_stage import evaluate_models

    res = evaluate_models(_cfg(bases, True, f"run.out_dir={bases}/run", "eval.max_items=4", "eval.max_new_tokens=4"),
                          columns=("ppo",))
    assert 0.0 <= res["ppo"]["rm"]["accuracy"] <= 1.0 and "pope" in res["ppo"]
    # a reward base with another vocabulary is refused, naming it
    other = build_tiny_checkpoint(bases / "other", TinyModelConfig(**REWARD_TINY, vocab_size=100), ["a b c"] * 3)
    with pytest.raises(ValueError, match="tokenizer differs"):
        P.load_reward_base(_cfg(bases, True, f"ppo.reward_base={other}"), load_tokenizer(bases / "tiny_base"),
                           torch.device("cpu"))


def test_rl_init_from_a_qlora_sft_run(bases):
    """A qlora `factrl sft` run writes sft/adapter; PPO with ppo.init_adapter on it (and no
    ppo.base) starts from the base it was trained on, not from sft/final (merged)."""
    from factrl.trainers import ppo as P
    from factrl.trainers.config import load_config
    from factrl.trainers.run import RunLayout
    from factrl.trainers.sft import train_sft

    root = bases / "qlora"
    cfg = load_config("tiny", POLICY + [f"run.out_dir={root}", f"data.root={bases}/data",
                                        f"model.checkpoint={bases}/tiny_base", "sft.mode=qlora", "sft.max_steps=2",
                                        "sft.batch_size=4", "sft.lr=1e-2"])
    train_sft(cfg)
    layout = RunLayout(root)
    ppo_cfg = load_config("tiny", POLICY + PPO + [f"run.out_dir={root}", f"data.root={bases}/data",
                                                  f"model.checkpoint={bases}/tiny_base",
                                                  f"ppo.init_adapter={layout.sft_adapter}",
                                                  f"ppo.reward_adapter={bases}/rm_a", "ppo.total_steps=1"])
    assert P.policy_base(ppo_cfg, layout) == bases / "tiny_base"
    assert P.train_ppo(ppo_cfg)["steps"] == 1


def test_plan_counts_each_base_once(bases):
    import json
    import subprocess
    import sys

    from factrl.model.io import load_llava
    from factrl.model.plan import ARCH, Arch, arch_from_model_config, count_params, plan
    from factrl.trainers.config import ModelConfig, TinyModelConfig

    # the reward base's counts equal the instantiated model's (as the policy base's, test_model)
    mc = ModelConfig(tiny=TinyModelConfig(**REWARD_TINY))
    m = load_llava(bases / "reward_base")
    arch = arch_from_model_config(mc)
    arch.vocab = m.text_config.vocab_size
    c = count_params(arch, 4, mc.lora.targets)
    assert c["decoder_linear"] == sum(lin.weight.numel() for _, lin in m.linears())
    assert c["vision"] == sum(p.numel() for p in m.vision.parameters())

    # 7B-224 policy + 13B-336 RM/value: every base item once, the value adapter at the 13B's size
    targets = ["q", "k", "v", "o", "gate", "up", "down"]
    a, r = Arch(**ARCH["llava-rlhf-7b-v1.5-224"]), Arch(**ARCH["llava-rlhf-13b-v1.5-336"])
    one_a, one_r = plan(a, 64, targets, 128, 896), plan(r, 64, targets, 128, 896)
    two = plan(a, 64, targets, 128, 896, reward_arch=r, init_adapter=True)
    s1a, s1r, s2 = one_a["static_bytes"], one_r["static_bytes"], two["static_bytes"]
    for item in ("decoder linears (NF4, double-quant)", "embeddings + lm_head + norms (bf16)",
                 "vision tower + projector (bf16)"):
        assert s2[f"policy base {item}"] == s1a[f"base {item}" if "decoder" in item else item]
        assert s2[f"reward base {item}"] == s1r[f"base {item}" if "decoder" in item else item]
    assert s2["adapter value on the reward base (fp32 w/grad/Adam)"] == 16 * two["reward_params"]["lora_per_adapter"]
    assert "adapter reference (RL-init, frozen, bf16)" in s2 and two["fits"]
    r = subprocess.run([sys.executable, "-m", "factrl.trainers.cli", "plan", "--config", "llava-v1.5-7b",
                        "--arch", "llava-rlhf-7b-v1.5-224", "--reward-base", "llava-rlhf-13b-v1.5-336",
                        "ppo.init_adapter=/models/rl-init"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["fits"] and last["reward_base"] == "llava-rlhf-13b-v1.5-336"
    assert last["peak_gib"] == round(two["peak_bytes"] / 2 ** 30, 2)
