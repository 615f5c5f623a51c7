"""Rollout engines: the interface the driver uses, the SGLang-protocol HTTP engine, managed server launch.

- :class:`RolloutEngine` (``base.py``): ``agenerate`` (batched, one HTTP request), ``update_weights_from_disk``,
  ``health``, ``flush_cache``, ``pause`` / ``resume``, ``shutdown``; sync wrapper ``generate``.
  :class:`SamplingParams` and :class:`Generation` are its data.
- :class:`SGLangEngine` (``sglang.py``): that interface over SGLang's native HTTP API; drives a real SGLang server
  and our CPU engine (``opd_train.serving``) alike.
- ``launch.py``: :func:`launch_sglang_server` (GPU machines; sglang is never imported, only looked for) and
  :func:`launch_cpu_engine` start a :class:`ManagedServer` subprocess, wait for ``/health`` and stop it cleanly.

The HTTP client underneath (retries, concurrency limit, request coalescing) is :mod:`opd_train.http`, shared
with the SGLang teacher client (:mod:`opd_train.teacher`).

Typical use::

    server = launch_cpu_engine(hf_dir)                  # or launch_sglang_server(hf_dir, extra_args=("--tp", "8"))
    engine = SGLangEngine(server=server, vocab_size=V)
    groups = engine.generate(prompt_ids, SamplingParams(max_new_tokens=8, temperature=1.0), n=4)
    engine.update_weights_from_disk(exported_hf_dir, weight_version="step-3")
    engine.shutdown()
"""
from .base import Generation, RolloutEngine, SamplingParams
from .launch import ManagedServer, free_port, is_sglang_available, launch_cpu_engine, launch_sglang_server
from .sglang import SGLangEngine

__all__ = ["Generation", "ManagedServer", "RolloutEngine", "SGLangEngine", "SamplingParams", "free_port",
           "is_sglang_available", "launch_cpu_engine", "launch_sglang_server"]
