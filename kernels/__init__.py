"""factrl.kernels: fused Triton kernels with PyTorch references (one file per op).

- factrl.kernels.nf4_lora.nf4_lora:  y = x @ dequant(W_nf4)^T + s·(x A^T) B^T (fwd/bwd/decode, grouped)
- factrl.kernels.logprobs.token_logprobs: lm_head → token log-probs (+entropy, KL), logits never materialized
- factrl.kernels.gae.gae / masked_whiten: GAE advantages/returns and masked whitening in one scan
Each public function takes ``backend=None | "triton" | "torch"``; CPU tensors default to torch.
(Functions named like their module are not re-exported here: that would hide the module.)
"""

from factrl.kernels._backend import HAS_CUDA, HAS_TRITON, resolve_backend
from factrl.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["HAS_CUDA", "HAS_TRITON", "resolve_backend", "NF4Weight", "dequantize_nf4", "quantize_nf4"]
