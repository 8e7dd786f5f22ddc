"""Command-line tools for preparing data, installed as ``mimae_scale.data_tools``."""
