"""Settings of the CPU engine server (``opd-train serve`` / ``python -m opd_train.serving``)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    model_path: str                       # HF model directory (config.json + *.safetensors); no downloads
    host: str = "127.0.0.1"               # loopback by default: the engine has no authentication
    port: int = 30000                     # 0 = let the OS pick (see port_file)
    port_file: str | None = None          # written (atomically) with the bound port once the server is up
    dtype: str = "float32"                # float32 | bfloat16 | float16
    num_threads: int | None = None        # torch intra-op threads; None = 1 on <= 4 cores (shared boxes), else torch's
    random_seed: int = 0                  # seeds the sampling RNG (per-request ``sampling_seed`` overrides it)
    served_model_name: str | None = None  # defaults to model_path, like SGLang
    weight_version: str = "default"
    max_running_requests: int = 1024      # sequences decoded together at most
    max_prefill_tokens: int = 16384       # padded tokens per prefill forward (scoring is chunked to fit)
    log_level: str = "warning"

    def validate(self) -> "ServerConfig":
        if not os.path.isdir(self.model_path):
            raise ValueError(f"--model {self.model_path!r} is not a directory: pass an HF model directory "
                             f"(config.json + *.safetensors).")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} is out of range: use 1-65535, or 0 to let the OS pick.")
        for name in ("max_running_requests", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {self.num_threads}.")
        return self

    def threads(self) -> int | None:
        if self.num_threads is not None:
            return self.num_threads
        return 1 if (os.cpu_count() or 1) <= 4 else None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of the serve command (SGLang's spellings where SGLang has the option)."""
    p = parser or argparse.ArgumentParser(prog="opd-train serve",
                                          description="SGLang-protocol CPU inference server (opd's own engine).")
    p.add_argument("--model", "--model-path", dest="model_path", required=True, help="HF model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=30000, help="port; 0 = pick a free one (see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once serving")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default 1 on <= 4 cores)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--max-running-requests", type=int, default=1024)
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="accepted for SGLang compatibility; this engine always serves token ids only")
    return p


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(model_path=ns.model_path, host=ns.host, port=ns.port, port_file=ns.port_file,
                        dtype=ns.dtype, num_threads=ns.num_threads, random_seed=ns.random_seed,
                        served_model_name=ns.served_model_name, weight_version=ns.weight_version,
                        max_running_requests=ns.max_running_requests, max_prefill_tokens=ns.max_prefill_tokens,
                        log_level=ns.log_level).validate()
