"""Loading and saving: llava-hf checkpoints ⇄ our model, role adapters ⇄ PEFT format.

Loading streams the safetensors shards tensor by tensor and quantizes each decoder linear to
NF4 as it arrives, so the largest high-precision tensor alive is one weight matrix (a 13B
checkpoint never sits in memory in bf16). Every write is atomic: a temp name, then a rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from factrl.model.llava import LINEAR_NAMES, LlavaModel, TextConfig
from factrl.model.lora import NF4_BUFFERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# our linear name -> llava-hf module path inside a decoder layer
HF_LINEAR = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
HF_LAYER_MISC = {"input_layernorm.weight": "input_norm.weight",
                 "post_attention_layernorm.weight": "post_norm.weight"}
# transformers' runtime module path of the decoder layers (what PEFT keys are built from)
PEFT_LAYER_PREFIX = "base_model.model.model.language_model.layers"


class CheckpointError(ValueError):
    pass


# ---- atomic writes ----------------------------------------------------------------------------
@contextmanager
def atomic_dir(path: str | os.PathLike, directory: bool = True):
    """Yield a temp path beside ``path`` — a fresh directory, or with ``directory=False`` a file
    name to write — that replaces ``path`` in one rename on success and is removed on failure:
    a killed writer never leaves half a checkpoint, config or data file. The one atomic writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        # the writer's pid in the name: a dead writer's leftovers are recognised (checkpoint.remove_dead_temps)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    else:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        old = None
        if directory and path.exists():  # a directory cannot be renamed over: move the old one aside
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


# ---- key mapping --------------------------------------------------------------------------------
def canonical_key(k: str) -> Optional[str]:
    """Map a llava-hf key (legacy ``language_model.model.*`` or transformers-5 runtime
    ``model.language_model.*``) to our parameter name; None for keys we do not hold."""
    k = re.sub(r"^model\.(language_model|vision_tower|multi_modal_projector)\.", r"\1.", k)
    if k in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    m = re.match(r"^language_model\.(?:model\.)?(.*)$", k)
    if m:
        rest = m.group(1)
        if rest == "embed_tokens.weight":
            return "embed_tokens.weight"
        if rest == "norm.weight":
            return "norm.weight"
        m2 = re.match(r"^layers\.(\d+)\.(.*)$", rest)
        if m2:
            i, sub = m2.groups()
            for ours, hf in HF_LINEAR.items():
                if sub == hf + ".weight":
                    return f"layers.{i}.{ours}.weight"
            if sub in HF_LAYER_MISC:
                return f"layers.{i}.{HF_LAYER_MISC[sub]}"
            if "rotary_emb" in sub:
                return None
        raise CheckpointError(f"unexpected language-model key {k!r}")
    m = re.match(r"^vision_tower\.(?:vision_model\.)?(.*)$", k)
    if m:
        return "vision." + m.group(1)
    if k.startswith("multi_modal_projector."):
        return "projector." + k[len("multi_modal_projector."):]
    raise CheckpointError(f"unexpected key {k!r}")


def hf_key(ours: str) -> Optional[str]:
    """Our parameter name → llava-hf (legacy layout, which transformers 4.x and 5.x both read)."""
    if ours == "lm_head.weight":
        return "language_model.lm_head.weight"
    if ours in ("embed_tokens.weight", "norm.weight"):
        return "language_model.model." + ours
    m = re.match(r"^layers\.(\d+)\.(\w+)\.(.*)$", ours)
    if m:
        i, mod, rest = m.groups()
        if mod in HF_LINEAR:
            return f"language_model.model.layers.{i}.{HF_LINEAR[mod]}.{rest}"
        inv = {v: k for k, v in HF_LAYER_MISC.items()}
        return f"language_model.model.layers.{i}.{inv[mod + '.' + rest]}"
    if ours.startswith("vision."):
        return "vision_tower.vision_model." + ours[len("vision."):]
    if ours.startswith("projector."):
        return "multi_modal_projector." + ours[len("projector."):]
    return None


# ---- loading --------------------------------------------------------------------------------------
def read_llava_config(path: Path):
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a llava-hf checkpoint directory)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    if "mm_vision_tower" in raw:
        raise CheckpointError(f"{cfg_file}: the original LLaVA layout (LlavaLlamaForCausalLM, mm_vision_tower); "
                              f"convert it once: factrl convert {path} DST")
    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 'llava'")
    tc = raw.get("text_config") or {}
    if tc.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{cfg_file}: text_config.model_type is {tc.get('model_type')!r}, expected 'llama'")
    from transformers import LlavaConfig

    return raw, LlavaConfig.from_pretrained(str(path))


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [path / f for f in files]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    for s in shards:
        if not s.is_file():
            raise CheckpointError(f"{s}: shard listed in the index is missing")
    return shards


def build_model(hf_cfg, device="cpu", dtype=torch.float32) -> LlavaModel:
    t = hf_cfg.text_config
    rope = getattr(t, "rope_parameters", None) or {}
    text = TextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                      num_kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
                      rms_norm_eps=t.rms_norm_eps, rope_theta=rope.get("rope_theta", getattr(t, "rope_theta", 1e4)),
                      max_position_embeddings=t.max_position_embeddings)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    with torch.device("meta"):
        model = LlavaModel(text, hf_cfg.vision_config, image_token_id=hf_cfg.image_token_index,
                           pad_token_id=getattr(hf_cfg, "pad_token_id", None) or 0,
                           eos_token_id=getattr(t, "eos_token_id", None) or 2,
                           vision_feature_layer=hf_cfg.vision_feature_layer,
                           select_strategy=hf_cfg.vision_feature_select_strategy)
    return model.to_empty(device=device).to(dtype) if dtype != torch.float32 else model.to_empty(device=device)


def load_llava(path: str | os.PathLike, quantize: bool = False, double_quant: bool = True, blocksize: int = 64,
               dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> LlavaModel:
    """Load a llava-hf directory. With ``quantize`` each decoder linear becomes NF4 on arrival."""
    from safetensors import safe_open

    path = Path(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    _, hf_cfg = read_llava_config(path)
    model = build_model(hf_cfg, device, dtype)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    linears = {f"{lin.name}.weight": lin for _, lin in model.linears()}
    seen = set()
    for shard in _shards(path):
        with _read(shard, lambda: safe_open(str(shard), framework="pt", device="cpu")) as f:
            for key in f.keys():
                ours = canonical_key(key)
                if ours is None:
                    continue
                if ours not in params and ours not in linears:
                    raise CheckpointError(f"{shard}: key {key!r} has no place in the model ({ours!r})")
                t = _read(shard, lambda: f.get_tensor(key))
                want = tuple(params[ours].shape) if ours in params else (linears[ours].out_features,
                                                                         linears[ours].in_features)
                if tuple(t.shape) != want:
                    raise CheckpointError(f"{shard}: {key!r} has shape {tuple(t.shape)}, expected {want}")
                if ours in linears and quantize:
                    lin = linears[ours]
                    lin.quantize_from_(t.to(device), double_quant, blocksize)
                else:
                    with torch.no_grad():
                        params[ours].copy_(t.to(device=device, dtype=params[ours].dtype))
                seen.add(ours)
                del t
    # Every base weight must have arrived (heads, adapters and CLIP's position_ids are not weights).
    missing = sorted(k for k in {*params, *linears} if k not in seen and not k.startswith("heads.")
                     and ".adapters." not in k and not k.endswith("position_ids"))
    if missing:
        raise CheckpointError(f"{path}: missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    # Buffers that are not weights (CLIP position_ids) were allocated empty: re-create them.
    emb = model.vision.vision_model.embeddings if hasattr(model.vision, "vision_model") else model.vision.embeddings
    if hasattr(emb, "position_ids"):
        emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1], device=device).expand_as(emb.position_ids))
    model.lm_head.weight.requires_grad_(False)
    model.vision.requires_grad_(False)
    return model


def _read(path: Path, fn):
    """``fn()``, its error (a truncated or corrupt safetensors file: the library names no file) naming ``path``."""
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_image_processor(path):
    from factrl.model.tiny import image_processor_class

    return image_processor_class().from_pretrained(str(path))


# ---- saving ---------------------------------------------------------------------------------------
def hf_state_dict(model: LlavaModel, dtype=None) -> dict[str, torch.Tensor]:
    """Base weights in llava-hf naming; NF4 linears are dequantized (adapters not merged)."""
    out = {}
    lin_names = {f"{lin.name}.weight": lin for _, lin in model.linears()}
    for name, lin in lin_names.items():
        out[hf_key(name)] = lin.dense_weight(dtype or torch.float32).contiguous()
    for name, p in model.state_dict().items():
        if name.startswith("heads.") or ".adapters." in name or name.split(".")[-1] in NF4_BUFFERS \
                or name in lin_names:
            continue
        if name.startswith("vision.") and name.endswith("position_ids"):
            continue
        k = hf_key(name)
        if k is not None:
            out[k] = (p.to(dtype) if dtype is not None and p.is_floating_point() else p).detach().contiguous().cpu()
    return {k: v.cpu() for k, v in out.items()}


def hf_config(model: LlavaModel):
    from transformers import LlamaConfig, LlavaConfig

    t = model.text_config
    text = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
                       rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
                       bos_token_id=1, eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=model.vision_config, text_config=text, image_token_index=model.image_token_id,
                       vision_feature_layer=model.vision_feature_layer,
                       vision_feature_select_strategy=model.select_strategy, projector_hidden_act="gelu",
                       pad_token_id=model.pad_token_id, tie_word_embeddings=False)


def save_llava_hf(model: LlavaModel, path, tokenizer=None, image_processor=None, dtype=None,
                  merge_adapter: Optional[str] = None) -> Path:
    """Write a llava-hf directory (config.json, model.safetensors, tokenizer, preprocessor).
    ``merge_adapter``: fold that LoRA adapter into the dense weights (a merged checkpoint)."""
    from safetensors.torch import save_file

    sd = hf_state_dict(model, dtype)
    if merge_adapter is not None:
        for _, lin in model.linears():
            if merge_adapter in lin.adapters:
                ad = lin.adapters[merge_adapter]
                k = hf_key(f"{lin.name}.weight")
                delta = (ad.lora_B.detach().float() @ ad.lora_A.detach().float()) * ad.scaling
                sd[k] = (sd[k].float() + delta.cpu()).to(sd[k].dtype)
    with atomic_dir(path) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config(model).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if image_processor is not None:
            image_processor.save_pretrained(str(tmp))
    return Path(path)


# ---- PEFT adapters ----------------------------------------------------------------------------------
def save_adapter(model: LlavaModel, name: str, path, base_path: str = "", heads: tuple[str, ...] = ()) -> Path:
    """Adapter ``name`` in PEFT format (adapter_config.json + adapter_model.safetensors), loadable
    by ``peft.PeftModel.from_pretrained`` on transformers' LlavaForConditionalGeneration; scalar
    heads beside it in heads.safetensors."""
    from safetensors.torch import save_file

    cfg = model.adapter_state.names[name]
    tensors = {}
    for n, lin in model.linears():
        if name in lin.adapters:
            i = lin.name.split(".")[1]
            base = f"{PEFT_LAYER_PREFIX}.{i}.{HF_LINEAR[n]}"
            ad = lin.adapters[name]
            tensors[f"{base}.lora_A.weight"] = ad.lora_A.detach().float().cpu().contiguous()
            tensors[f"{base}.lora_B.weight"] = ad.lora_B.detach().float().cpu().contiguous()
    targets = "|".join(HF_LINEAR[t].split(".")[1] for t in cfg["targets"])
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_path),
        "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "bias": "none",
        # The regex keeps the CLIP tower's own q/k/v projections out.
        "target_modules": rf".*language_model.*\.({targets})", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        head_tensors = {f"{h}.{k}": v.detach().float().cpu().contiguous()
                        for h in heads for k, v in model.heads[h].state_dict().items()}
        if head_tensors:
            save_file(head_tensors, str(tmp / "heads.safetensors"))
    return Path(path)


def adapter_dir(path) -> Path:
    """The directory holding adapter_config.json: ``path`` itself, or below it the original's
    ``adapter_model/`` then ``lora_default/`` (LLaVA-RLHF's checkpoint-N layout, descended into
    as RLHF/models/qlora_model.py:69-74 does)."""
    path = Path(path)
    for sub in ("adapter_model", "lora_default"):
        if (path / sub).is_dir():
            path = path / sub
    return path


def adapter_base(path) -> Optional[str]:
    """The base_model_name_or_path an adapter's config records (None when absent)."""
    f = adapter_dir(path) / "adapter_config.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (not a PEFT adapter directory)")
    return json.loads(f.read_text()).get("base_model_name_or_path") or None


def _torch_file(f: Path) -> dict:
    """A torch.save'd state dict (the original's adapter_model.bin, reward_head, value_head.pt),
    read with weights_only: tensors only, no code runs."""
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise CheckpointError(f"{f}: not a readable torch state dict: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f}: expected a dict of tensors")
    return sd


# The original's head files: RLHF/lora_utils.py:36-42 saves the RM's nn.Linear(H, 1) state dict
# as <checkpoint>/reward_head, read back by RLHF/models/reward_model.py:170-178; the PPO value
# head is <checkpoint>/value_head.pt (RLHF/models/rl_trainer.py:79, 869-870). Keys: weight, bias.
ORIGINAL_HEAD_FILES = {"reward": "reward_head", "value": "value_head.pt"}


def load_adapter(model: LlavaModel, path, name: str, trainable: bool = True) -> None:
    """Load a PEFT-format adapter into the bank as ``name`` (+ heads if present): ours or peft's
    (adapter_model.safetensors), or the original LLaVA-RLHF's (adapter_model.bin, possibly under
    adapter_model/lora_default/, with its reward_head / value_head.pt files beside)."""
    from safetensors.torch import load_file

    top = Path(path)
    path = adapter_dir(top)
    cfg_file = path / "adapter_config.json"
    w_file = path / "adapter_model.safetensors"
    if not w_file.is_file() and (path / "adapter_model.bin").is_file():
        w_file = path / "adapter_model.bin"
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}, only LORA adapters load")
    tensors = _read(w_file, lambda: load_file(str(w_file))) if w_file.suffix == ".safetensors" else _torch_file(w_file)
    by_layer: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    inv = {v: k for k, v in HF_LINEAR.items()}
    for k, v in tensors.items():
        if "vision" in k:  # a CLIP tower's self_attn.q_proj would match the pattern below
            raise CheckpointError(f"{w_file}: key {k!r} adapts the vision tower, which factrl keeps frozen")
        m = re.search(r"layers\.(\d+)\.(self_attn\.\w+_proj|mlp\.\w+_proj)\.lora_([AB])(?:\.\w+)?\.weight$", k)
        if not m or m.group(2) not in inv:
            raise CheckpointError(f"{w_file}: unexpected key {k!r}")
        by_layer.setdefault((int(m.group(1)), inv[m.group(2)]), {})[m.group(3)] = v
    targets = sorted({t for _, t in by_layer}, key=LINEAR_NAMES.index)
    if name not in model.adapter_state.names:
        model.add_adapter(name, int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)),
                          targets)
    for (i, t), ab in by_layer.items():
        lin = getattr(model.layers[i], t)
        if name not in lin.adapters:
            raise CheckpointError(f"{w_file}: layer {i} {t} not among adapter {name!r}'s targets")
        ad = lin.adapters[name]
        for which, p in (("A", ad.lora_A), ("B", ad.lora_B)):
            if which not in ab or tuple(ab[which].shape) != tuple(p.shape):
                raise CheckpointError(f"{w_file}: layer {i} {t} lora_{which} shape "
                                      f"{tuple(ab[which].shape) if which in ab else None} != {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(ab[which].to(p.dtype))
            p.requires_grad_(trainable)
    heads = path / "heads.safetensors"
    found = {}
    if heads.is_file():
        for k, v in _read(heads, lambda: load_file(str(heads))).items():
            h, param = k.split(".", 1)
            found.setdefault(h, {})[param] = (v, heads)
    for h, fname in ORIGINAL_HEAD_FILES.items():
        for d in dict.fromkeys((top, path)):  # the checkpoint dir (the original's place), or the adapter's
            if (d / fname).is_file() and h not in found:
                found[h] = {param: (v, d / fname) for param, v in _torch_file(d / fname).items()}
    for h, params in found.items():
        if h not in model.heads:
            model.add_head(h)
        want = model.heads[h].state_dict()
        if set(params) != set(want):
            raise CheckpointError(f"{next(iter(params.values()))[1]}: head {h!r} has keys {sorted(params)}, "
                                  f"expected {sorted(want)}")
        for param, (v, f) in params.items():
            if tuple(v.shape) != tuple(want[param].shape):
                raise CheckpointError(f"{f}: head {h!r} {param} shape {tuple(v.shape)} != {tuple(want[param].shape)}")
            with torch.no_grad():
                want[param].copy_(v)
        model.heads[h].requires_grad_(trainable)
