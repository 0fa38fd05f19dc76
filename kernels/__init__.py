"""factrl.kernels: fused Triton kernels with PyTorch references (one file per op).

- nf4_lora:  y = x @ dequant(W_nf4)^T + s·(x A^T) B^T, fwd/bwd/decode, grouped adapters
- logprobs:  lm_head → token log-probs (+entropy, KL) without materializing the logits
- gae:       GAE advantages/returns and masked whitening in one scan
Each public function takes ``backend=None | "triton" | "torch"``; CPU tensors default to torch.
"""

from factrl.kernels._backend import HAS_CUDA, HAS_TRITON, resolve_backend
from factrl.kernels.gae import gae, gae_reference, masked_mean, masked_whiten
from factrl.kernels.logprobs import kl_penalty, logprobs_from_logits, token_logprobs, token_logprobs_kl
from factrl.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from factrl.kernels.nf4_lora import nf4_lora, nf4_lora_reference

__all__ = ["HAS_CUDA", "HAS_TRITON", "resolve_backend", "NF4Weight", "dequantize_nf4", "quantize_nf4",
           "nf4_lora", "nf4_lora_reference", "token_logprobs", "token_logprobs_kl", "logprobs_from_logits",
           "kl_penalty", "gae", "gae_reference", "masked_whiten", "masked_mean"]
