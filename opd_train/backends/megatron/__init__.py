"""Megatron-core trainer backend (work in progress; API documented when complete)."""
