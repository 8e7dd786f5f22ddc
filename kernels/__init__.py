"""Triton kernels for MI-MAE's hot path, installed as ``mimae_scale.kernels``."""
