"""Triton kernels for MI-MAE's hot path, installed as ``mimae_scale.kernels``.

Each public function has the signature and semantics of the plain-PyTorch reference it replaces
(:mod:`mimae_scale.masking`, :mod:`mimae_scale.losses`) and is differentiable (a
``torch.autograd.Function`` with Triton forward and backward kernels). They run on CUDA tensors,
or on CPU tensors when Triton's interpreter was on (``TRITON_INTERPRET=1``) at import time.
:mod:`mimae_scale.ops` chooses between them and the references (config ``kernels.enabled``).
"""

from triton import knobs

from .gather import gather_visible, unshuffle_with_mask_tokens
from .info_nce import info_nce
from .losses import club_upper_bound, gaussian_nll, norm_pix_mse

# Triton decides at decoration time whether a kernel is interpreted; the kernels above have been
# decorated by now, so this is whether they run on CPU tensors.
INTERPRETED: bool = bool(knobs.runtime.interpret)

__all__ = [
    "INTERPRETED",
    "club_upper_bound",
    "gather_visible",
    "gaussian_nll",
    "info_nce",
    "norm_pix_mse",
    "unshuffle_with_mask_tokens",
]
