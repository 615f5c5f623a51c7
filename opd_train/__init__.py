"""opd-train: on-policy distillation driver (Ray + Megatron-core + SGLang / our CPU engine)."""
