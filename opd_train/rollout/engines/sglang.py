"""`SGLangEngine`: the SGLang native HTTP API as a :class:`RolloutEngine`.

The same class drives a real SGLang server (GPU) and our CPU engine (``opd_train.serving``): they speak the same
``/generate`` subset, so the driver's rollout code is identical on CPU and GPU. Give it a URL (an existing server)
or a :class:`~opd_train.rollout.engines.launch.ManagedServer` (it then owns the process and stops it on
``shutdown``).

Ids are validated before sending when ``vocab_size`` is known (SGLang 0.5.23 dies on negative / oversized ids and
answers another token's score for ``id == vocab_size``), and every response is checked for the expected number of
entries (retried as an invalid response, then a clear error naming the URL).

Concurrent ``agenerate`` calls with equal sampling settings are coalesced (``coalesce_ms``, default 2 ms) into one
``/generate`` request: one call per prompt group costs the same as one batched call (HTTP overhead is ~1-2 ms per
request on the 2-core CPU machines, comparable to a whole decode step of a tiny model).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import Generation, RolloutEngine, SamplingParams
from ...http import AsyncHTTP, Coalescer, InvalidResponse, RequestFailed, RetryPolicy, validate_ids
from .launch import ManagedServer


class SGLangEngine(RolloutEngine):
    def __init__(self, url: str | None = None, *, server: ManagedServer | None = None, vocab_size: int | None = None,
                 policy: RetryPolicy | None = None, concurrency: int = 64, http: AsyncHTTP | None = None,
                 coalesce_ms: float = 2.0, max_batch: int = 256):
        if (url is None) == (server is None):
            raise ValueError("give exactly one of url= (an existing server) or server= (a ManagedServer)")
        self.server = server
        self.url = (server.url if server is not None else url).rstrip("/")
        self.vocab_size = vocab_size
        self.http = http or AsyncHTTP(concurrency=concurrency, policy=policy)
        self._coalescer = None if coalesce_ms <= 0 else Coalescer(
            self.http, self._send_generate, window_ms=coalesce_ms, max_size=max_batch,
            size=lambda prompts: len(prompts))

    # ------------------------------------------------------------------------------------------------ generate
    async def agenerate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[Generation]]:
        """Concurrent calls with the same (params, n) within ``coalesce_ms`` share one HTTP request, so the
        driver may send one call per prompt group (and score each group as soon as it returns) at no extra cost."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return []
        validate_ids(prompts, self.vocab_size)
        if self._coalescer is None:
            return await self.http.post_json(*self._generate_request(prompts, params, n))
        return await self._coalescer.submit((params, n), [list(p) for p in prompts])

    def _generate_request(self, prompts: list[list[int]], params: SamplingParams, n: int):
        payload = {"input_ids": prompts, "sampling_params": {**params.to_sglang(), "n": n}, "return_logprob": True}

        def check(body: Any) -> list[list[Generation]]:
            items = _as_list(body, len(prompts) * n)
            gens = [_generation(prompts[k // n], item, params.max_new_tokens) for k, item in enumerate(items)]
            return [gens[i * n:(i + 1) * n] for i in range(len(prompts))]

        return f"{self.url}/generate", payload, check

    async def _send_generate(self, key: tuple, calls: list[list[list[int]]]) -> list[list[list[Generation]]]:
        params, n = key
        merged = [p for prompts in calls for p in prompts]
        groups = await self.http.request_in_loop(*self._generate_request(merged, params, n))
        out, i = [], 0
        for prompts in calls:                       # hand each caller its own prompts' groups back
            out.append(groups[i:i + len(prompts)])
            i += len(prompts)
        return out

    # ------------------------------------------------------------------------------------------------ control
    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        payload: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        try:
            reply = self.http.post_json_sync(f"{self.url}/update_weights_from_disk", payload)
        except RequestFailed as exc:
            raise RuntimeError(f"update_weights_from_disk({model_path!r}) on {self.url} failed: {exc}") from exc
        if not (isinstance(reply, dict) and reply.get("success")):
            raise RuntimeError(f"update_weights_from_disk({model_path!r}) on {self.url} failed: {reply!r}")

    def update_weights_from_tensors(self, named_tensors: Mapping[str, torch.Tensor],
                                    weight_version: str | None = None) -> None:
        raise NotImplementedError(
            "tensor weight updates over HTTP need SGLang's in-process serializer (same node, sglang importable); "
            "this engine syncs through update_weights_from_disk (export HF safetensors to a tmpfs directory)")

    def health(self, *, generate: bool = False) -> bool:
        try:
            status, _ = self.http.get_sync(f"{self.url}/health_generate" if generate else f"{self.url}/health")
        except RequestFailed:
            return False
        return status == 200

    def flush_cache(self) -> None:
        self.http.post_json_sync(f"{self.url}/flush_cache", {}, parse=False)  # SGLang answers plain text

    def pause(self) -> None:
        self.http.post_json_sync(f"{self.url}/pause_generation", {})

    def resume(self) -> None:
        self.http.post_json_sync(f"{self.url}/continue_generation", {})

    def server_info(self) -> dict:
        status, body = self.http.get_sync(f"{self.url}/get_server_info", retry=True)
        import orjson
        return orjson.loads(body)

    def shutdown(self) -> None:
        self.http.close()
        if self.server is not None:
            self.server.stop()


def _as_list(body: Any, expected: int) -> list[dict]:
    items = body if isinstance(body, list) else [body]
    if len(items) != expected or not all(isinstance(x, dict) and "meta_info" in x for x in items):
        raise InvalidResponse(f"expected {expected} result object(s) with meta_info, got "
                              f"{len(items) if isinstance(body, list) else type(body).__name__}")
    return items


def _generation(prompt: list[int], item: dict, max_new_tokens: int) -> Generation:
    meta = item["meta_info"]
    out = item.get("output_ids")
    lps = meta.get("output_token_logprobs")
    if not isinstance(out, list) or not isinstance(lps, list) or len(lps) != len(out) or len(out) > max_new_tokens:
        raise InvalidResponse(f"output_ids ({_len(out)}) and output_token_logprobs ({_len(lps)}) disagree or exceed "
                              f"max_new_tokens={max_new_tokens}")
    values = [e[0] if isinstance(e, list) and e else None for e in lps]
    if any(v is None for v in values):
        raise InvalidResponse("null log-prob among output_token_logprobs")
    reason = (meta.get("finish_reason") or {}).get("type", "abort")
    rest = {k: v for k, v in meta.items() if not k.endswith("logprobs")}
    return Generation(prompt_ids=list(prompt), output_ids=list(out), output_logprobs=[float(v) for v in values],
                      finish_reason=reason, weight_version=str(meta.get("weight_version", "default")), meta=rest)


def _len(x: Any) -> str:
    return str(len(x)) if isinstance(x, list) else type(x).__name__
