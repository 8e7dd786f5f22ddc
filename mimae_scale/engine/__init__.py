"""The training engine: DeepSpeed set-up, the loop, checkpoints, signals and logging.

Modules: ``distributed`` (rank/world from any launcher), ``ds_config`` (DeepSpeed's config from
ours), ``optim`` (AdamW groups, lr rule and schedule), ``checkpoint`` (completion protocol),
``signals`` (preemption), ``reporting`` (metrics sinks), ``faults`` (test-only fault injection),
``trainer`` (the loop).
"""
