"""factrl.kernels: fused Triton kernels with PyTorch references (one file per op).

- factrl.kernels.nf4_lora.nf4_lora:  y = x @ dequant(W_nf4)^T + s·(x A^T) B^T (fwd/bwd/decode, grouped)
- factrl.kernels.logprobs.token_logprobs: lm_head → token log-probs (+entropy, KL), logits never materialized
- factrl.kernels.gae.gae / masked_whiten: GAE advantages/returns and masked whitening in one scan
Each public function takes ``backend=None | "triton" | "torch"``; CPU tensors default to torch.
(Functions named like their module are not re-exported here: that would hide the module.)
"""

if __name__ == "kernels":
    # This folder imported by its own name: the checkout's root is on sys.path (`python -m ...` or a script
    # run from the checkout, `python -m pytest`). It then shadows Hugging Face's `kernels` distribution, which
    # transformers >= 5.25 requires and imports from `transformers.activations` -- CI on 2026-12-03: "cannot
    # import name 'CUDAProperties' from 'kernels' (.../kernels/__init__.py)". Hand the name over to that
    # package where it is installed; where it is not, stay an empty module without __version__, which
    # transformers reads as "kernels not installed". Our code always imports this folder as factrl.kernels.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
else:
    from factrl.kernels._backend import HAS_CUDA, HAS_TRITON, resolve_backend
    from factrl.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

    __all__ = ["HAS_CUDA", "HAS_TRITON", "resolve_backend", "NF4Weight", "dequantize_nf4", "quantize_nf4"]
