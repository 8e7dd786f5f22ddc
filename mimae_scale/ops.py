"""Kernel or reference: which implementation of the hot-path ops the model calls (``kernels.enabled``).

Both implementations expose the same six functions with the same signatures:
``gather_visible``, ``unshuffle_with_mask_tokens``, ``norm_pix_mse``, ``info_nce``,
``club_upper_bound``, ``gaussian_nll``.

- ``auto``: the Triton kernels on CUDA tensors, the plain-PyTorch references elsewhere.
- ``on``: the Triton kernels always. On CPU tensors that needs Triton's interpreter
  (``TRITON_INTERPRET=1`` before the kernels are imported): tests and debugging only.
- ``off``: the references always.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch

from mimae_scale import losses, masking
from mimae_scale.config import ConfigError

MODES = ("auto", "on", "off")
Implementation = ModuleType | SimpleNamespace  # mimae_scale.kernels, or REFERENCE

REFERENCE = SimpleNamespace(
    gather_visible=masking.gather_visible,
    unshuffle_with_mask_tokens=masking.unshuffle_with_mask_tokens,
    norm_pix_mse=losses.norm_pix_mse,
    info_nce=losses.info_nce,
    club_upper_bound=losses.club_upper_bound,
    gaussian_nll=losses.gaussian_nll,
)


def implementation(enabled: str, device: torch.device) -> Implementation:
    """The namespace whose functions the model calls for tensors on ``device``."""
    if enabled not in MODES:
        raise ConfigError(f"kernels.enabled: must be one of {MODES}, got {enabled!r}")
    if enabled == "off" or (enabled == "auto" and device.type != "cuda"):
        return REFERENCE
    from mimae_scale import kernels  # imports Triton; only when kernels may run

    if device.type != "cuda" and not kernels.INTERPRETED:
        raise ConfigError(
            f"kernels.enabled: 'on' runs Triton kernels, which need CUDA tensors (got {device.type}) "
            "or Triton's interpreter (TRITON_INTERPRET=1 set before start); use 'auto' or 'off' here"
        )
    return kernels
