"""FastAPI/uvicorn HTTP server speaking SGLang's native API subset, backed by :class:`Scheduler`.

Endpoints (SGLang 0.5.23 names): ``POST /generate``, ``GET /health``, ``GET /health_generate``,
``POST /update_weights_from_disk``, ``GET /model_info`` (+ deprecated ``/get_model_info``), ``GET /server_info``
(+ ``/get_server_info``: a subset of SGLang's 600 keys, plus ``vocab_size``), ``POST /flush_cache`` (plain text),
``POST /pause_generation`` and ``POST /continue_generation``.

Entry points: :func:`serve` (blocking), :func:`main` (argv; used by ``opd-train serve`` and
``python -m opd_train.serving``) and :func:`start_in_thread` (in-process server for tests and tools).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from ..http import paused_gc
from .config import ServerConfig, build_parser, config_from_args
from .model_runner import ModelRunner
from .protocol import ModelLimits, ProtocolError, build_generate_response, decode_json_body, parse_generate_request
from .scheduler import Scheduler
from .types import SamplingSpec, SeqRequest
from .weights import WeightUpdateError

ENGINE_VERSION = "opd-cpu-engine 0.1 (SGLang 0.5.23 /generate subset)"
_FLUSH_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
               "requests, the operation will not be performed.)\n")


def _json(content, status: int = 200) -> Response:
    # orjson writes NaN/inf as null, like SGLang's ORJSONResponse.
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


@dataclass
class EngineState:
    config: ServerConfig
    runner: ModelRunner
    scheduler: Scheduler
    tokenizer_path: str
    port: int = 0


def create_app(state: EngineState) -> FastAPI:
    app = FastAPI(title="opd CPU engine", docs_url=None, redoc_url=None, openapi_url=None)
    runner, scheduler = state.runner, state.scheduler
    limits = ModelLimits(vocab_size=runner.vocab_size, max_context=runner.max_context)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        started, raw = time.time(), await request.body()
        try:
            with paused_gc():       # bulk JSON: see opd_train.http.paused_gc
                parsed = parse_generate_request(decode_json_body(raw), limits)
        except ProtocolError as exc:
            return _json(exc.body, exc.status)
        try:
            results = await asyncio.wrap_future(scheduler.submit(parsed.seqs))
        except Exception as exc:  # the engine thread reported a failure for this batch; the server stays up
            return _json({"error": {"message": f"engine error: {type(exc).__name__}: {exc}"}}, 500)
        with paused_gc():
            return _json(build_generate_response(parsed, results, started))

    _add_control_routes(app, state)
    return app


def _add_control_routes(app: FastAPI, state: EngineState) -> None:
    scheduler = state.scheduler

    @app.get("/health")
    async def health() -> Response:
        ok = scheduler.is_alive()
        return Response(b"", status_code=200 if ok else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        seq = SeqRequest(input_ids=[0], sampling=SamplingSpec(max_new_tokens=1, top_k=1))
        try:
            await asyncio.wait_for(asyncio.wrap_future(scheduler.submit([seq])), timeout=20)
        except Exception:
            return Response(b"", status_code=503)
        return Response(b"", status_code=200)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        return await _update_weights(state, request)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> Response:
        return _json(_model_info(state))

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        return _json(_server_info(state))

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        return PlainTextResponse(_FLUSH_TEXT)   # no cross-request KV cache to flush

    @app.post("/pause_generation")
    async def pause_generation() -> Response:
        scheduler.pause()
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def continue_generation() -> Response:
        scheduler.resume()
        return _json({"message": "Generation continued successfully.", "status": "ok"})


async def _update_weights(state: EngineState, request: Request) -> Response:
    def fail(message: str) -> Response:
        return _json({"success": False, "message": message, "num_paused_requests": 0}, 400)

    try:
        body = decode_json_body(await request.body())
    except ProtocolError as exc:
        return _json(exc.body, exc.status)
    path, version = body.get("model_path"), body.get("weight_version")
    if not isinstance(path, str) or not path:
        return fail("model_path (a string: the HF directory with the new safetensors) is required.")
    if version is not None and not isinstance(version, str):
        return fail(f"weight_version must be a string, got {version!r}.")
    future = state.scheduler.run_exclusive(lambda: state.runner.load_weights_from_disk(path, version))
    try:
        await asyncio.wrap_future(future)
    except WeightUpdateError as exc:
        return fail(str(exc))
    except Exception as exc:
        return fail(f"Failed to update weights from {path}: {type(exc).__name__}: {exc}")
    message = "Succeeded to update model weights."
    if version is not None:
        message += f" Weight version updated to {version}."
    return _json({"success": True, "message": message, "num_paused_requests": 0})


def _model_info(state: EngineState) -> dict:
    runner, cfg = state.runner, state.runner.config
    return {"model_path": runner.model_path, "served_model_name": state.config.served_model_name or runner.model_path,
            "tokenizer_path": state.tokenizer_path, "is_generation": True, "preferred_sampling_params": None,
            "weight_version": runner.weight_version, "load_format": "auto", "reasoning_parser": None,
            "tool_call_parser": None, "disaggregation_mode": "null", "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": getattr(cfg, "model_type", None),
            "architectures": getattr(cfg, "architectures", None), "embedding": {"enabled": False}}


def _server_info(state: EngineState) -> dict:
    c, runner, sch = state.config, state.runner, state.scheduler
    return {"model_path": runner.model_path, "tokenizer_path": state.tokenizer_path, "skip_tokenizer_init": True,
            "dtype": c.dtype, "device": "cpu", "host": c.host, "port": state.port, "random_seed": c.random_seed,
            "served_model_name": c.served_model_name or runner.model_path, "weight_version": runner.weight_version,
            "context_length": runner.max_context, "max_running_requests": c.max_running_requests,
            "max_prefill_tokens": c.max_prefill_tokens, "disable_radix_cache": True,
            "launch_command": " ".join(sys.argv), "status": "ready", "version": ENGINE_VERSION,
            "vocab_size": runner.vocab_size, "num_threads": torch.get_num_threads(),
            "internal_states": [{"num_running_reqs": sch.num_running, "num_waiting_reqs": sch.num_waiting,
                                 **vars(sch.stats)}]}


def build_state(config: ServerConfig) -> EngineState:
    threads = config.threads()
    if threads is not None:
        torch.set_num_threads(threads)
    runner = ModelRunner(config.model_path, dtype=config.dtype, seed=config.random_seed,
                         weight_version=config.weight_version, max_prefill_tokens=config.max_prefill_tokens)
    scheduler = Scheduler(runner, max_running_requests=config.max_running_requests)
    scheduler.start()
    return EngineState(config=config, runner=runner, scheduler=scheduler, tokenizer_path=config.model_path)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port} ({exc}); pick another --port or use --port 0") from exc
    sock.listen(2048)
    return sock


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)


class _Server(uvicorn.Server):
    """uvicorn server that reports readiness (port file / event) only once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready):
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self._on_ready()


def _make_server(state: EngineState, on_ready) -> tuple[_Server, socket.socket]:
    sock = _bind(state.config.host, state.config.port)
    state.port = sock.getsockname()[1]
    uconf = uvicorn.Config(create_app(state), log_level=state.config.log_level, access_log=False,
                           lifespan="off", timeout_keep_alive=60)
    return _Server(uconf, on_ready), sock


def serve(config: ServerConfig) -> None:
    """Load the model and serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = build_state(config)

    def ready() -> None:
        if config.port_file:
            _write_port_file(config.port_file, state.port)
        print(f"opd CPU engine serving {config.model_path} on http://{config.host}:{state.port}", flush=True)

    server, sock = _make_server(state, ready)
    try:
        server.run(sockets=[sock])
    finally:
        state.scheduler.stop()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0


@dataclass
class ServerHandle:
    """An in-process server on a background thread (``stop()`` shuts it down)."""

    state: EngineState
    url: str
    _server: _Server
    _thread: threading.Thread

    def update_weights_from_tensors(self, named_tensors: dict, weight_version: str | None = None) -> None:
        """In-process weight update (no disk round trip); waits like the HTTP update for running generations."""
        self.state.scheduler.run_exclusive(
            lambda: self.state.runner.load_weights_from_tensors(named_tensors, weight_version)).result()

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.state.scheduler.stop()


def start_in_thread(config: ServerConfig, timeout: float = 30.0) -> ServerHandle:
    state = build_state(config.validate())
    started = threading.Event()
    server, sock = _make_server(state, started.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="opd-engine-http", daemon=True)
    thread.start()
    if not started.wait(timeout):
        server.should_exit = True
        state.scheduler.stop()
        raise RuntimeError(f"the in-process engine server did not start within {timeout} s")
    return ServerHandle(state=state, url=f"http://{config.host}:{state.port}", _server=server, _thread=thread)
