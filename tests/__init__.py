"""The test suite: ``unit/`` (fast, one process, no services: ``make test-fast``), ``integration/``
(several processes, DeepSpeed ranks, Slurm, Prometheus, the launchers, end to end) and ``helpers/``
(shared by both, imported as ``tests.helpers.<module>``)."""
