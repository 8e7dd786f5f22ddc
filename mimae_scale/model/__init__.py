"""The MI-MAE model and its parts."""

from mimae_scale.model.mimae import MIMAE, MIMAEOutput, build_model

__all__ = ["MIMAE", "MIMAEOutput", "build_model"]
