"""Before anything starts (SGLang mode): the teacher server answers and scores this student's token ids.

The server must answer ``/health``; its tokenizer must be the student's (a teacher with a larger, padded
embedding is fine: see :mod:`opd_train.hf`). The tokenizer is compared through the teacher's model directory when
the server reports one readable here (``/get_model_info`` ``model_path``, as SGLang and our CPU engine do), else
the ``vocab_size`` our CPU engine reports in ``/get_server_info`` must equal the student's.
"""
from __future__ import annotations

import os

import orjson

from .. import hf
from ..http import AsyncHTTP, RequestFailed, RetryPolicy
from ..types import TeacherUnavailable
from .sglang import server_url


class TeacherMismatch(ValueError):
    """The teacher server cannot score the student's tokens (another tokenizer, a smaller vocabulary)."""


def preflight(rm_url: str, *, student_dir: str | None, student_vocab: int | None, timeout: float,
              attempts: int = 3) -> dict:
    """Facts about the teacher (``{"vocab_size": V}`` when known); raises TeacherUnavailable / TeacherMismatch."""
    base = server_url(rm_url)
    http = AsyncHTTP(concurrency=2, policy=RetryPolicy(timeout=timeout, max_retries=attempts - 1, backoff=1.0,
                                                       backoff_max=5.0))
    try:
        try:
            status, _ = http.get_sync(f"{base}/health", retry=True)
        except RequestFailed as exc:
            status, why = None, str(exc)
        if status != 200:
            why = why if status is None else f"/health answered HTTP {status}"
            raise TeacherUnavailable(f"the teacher at {base} is not reachable ({why}); start it first (GPU: python "
                                     f"-m sglang.launch_server --model-path TEACHER ...; CPU: opd-train serve --model "
                                     f"TEACHER --port PORT) and check --rm-url", url=base)
        info, server = (_json(http, f"{base}/{path}") for path in ("get_model_info", "get_server_info"))
    finally:
        http.close()
    model_dir = info.get("model_path") or ""
    facts: dict = {}
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        facts["vocab_size"] = hf.read_config(model_dir).get("vocab_size")
        problem = None if student_dir is None or student_vocab is None else hf.teacher_mismatch(
            student_dir, student_vocab, model_dir, facts["vocab_size"])
        if problem:
            raise TeacherMismatch(problem)
    elif isinstance(server.get("vocab_size"), int):
        facts["vocab_size"] = server["vocab_size"]
        if student_vocab is not None and facts["vocab_size"] != student_vocab:
            raise TeacherMismatch(f"the teacher at {base} has vocab_size {facts['vocab_size']} but the student has "
                                  f"{student_vocab}, and its model directory is not readable here to compare the "
                                  "tokenizers; OPD needs one shared tokenizer")
    return facts


def _json(http: AsyncHTTP, url: str) -> dict:
    """A GET's JSON object, or {} (servers without the endpoint: nothing more to check)."""
    try:
        status, body = http.get_sync(url)
        parsed = orjson.loads(body) if status == 200 else {}
    except (RequestFailed, orjson.JSONDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
