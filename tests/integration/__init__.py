"""Multi-process, DeepSpeed multi-rank, Slurm, Prometheus, launcher and end-to-end tests."""
