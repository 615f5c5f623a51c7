"""opd's own SGLang-protocol inference engine for CPU machines (real SGLang needs a GPU: SPEC §5).

An HF transformers causal LM behind a FastAPI/uvicorn server that speaks the subset of SGLang's native HTTP API the
driver uses (``/generate`` with prompt/output log-probs, top-k and token-id log-probs, ``/health``,
``/health_generate``, ``/update_weights_from_disk``, ``/model_info``, ``/get_server_info``, ``/flush_cache``), with
SGLang 0.5.23's response shapes and error bodies. It serves as the student's rollout engine and as the teacher
server on CPU, so the driver's HTTP code is the same on CPU and GPU.

Public API:
- ``main(argv)``: the ``opd-train serve`` / ``python -m opd_train.serving`` entry point (flags: ``--help``);
- ``serve(ServerConfig)``: blocking server;
- ``start_in_thread(ServerConfig) -> ServerHandle``: in-process server (``.url``, ``.stop()``);
- ``ServerConfig``, ``build_parser(parser=None)`` (to embed the flags in another CLI), ``config_from_args``.

Heavy imports (torch, transformers, fastapi) happen only when these are used.
"""
from __future__ import annotations

from .config import ServerConfig, build_parser, config_from_args

__all__ = ["ServerConfig", "build_parser", "config_from_args", "main", "serve", "start_in_thread"]


def main(argv: list[str] | None = None) -> int:
    from .server import main as _main
    return _main(argv)


def serve(config: ServerConfig) -> None:
    from .server import serve as _serve
    _serve(config)


def start_in_thread(config: ServerConfig, timeout: float = 30.0):
    from .server import start_in_thread as _start
    return _start(config, timeout)
