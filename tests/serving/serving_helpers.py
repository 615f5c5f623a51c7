"""Helpers for the CPU engine tests: the captured SGLang 0.5.23 exchanges, their tiny models, HF references."""
from __future__ import annotations

import json
import pathlib

import torch

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sglang-0.5.23"
MODEL_V1 = str(FIXTURES / "model")
MODEL_V2 = str(FIXTURES / "model_v2")
VOLATILE = {"id", "e2e_latency", "response_sent_to_client_ts"}


def capture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def all_captures() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json") if p.stem != "hf_comparison")


def hf_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(ids), V) fp32 log_softmax(logits / T) of one unpadded sequence (row j predicts ids[j + 1])."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def post(url: str, body, *, raw: bool = False, timeout: float = 60.0) -> tuple[int, object]:
    """Blocking POST; returns (status, parsed JSON or text)."""
    import urllib.error
    import urllib.request
    data = body.encode() if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload.decode()


def get(url: str, timeout: float = 30.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
