"""mimae_scale: distributed pretraining of MI-MAE."""

__version__ = "0.1.0"
