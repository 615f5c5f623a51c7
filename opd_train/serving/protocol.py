"""SGLang ``/generate`` request parsing/validation and response building (the subset our CPU engine serves).

Ground truth: the captures of a live SGLang 0.5.23 server in ``shared/fixtures/sglang-0.5.23`` (see its README).
Response shapes, key order, the first-entry-``null`` convention, the prompt-major ``n`` expansion and both error
body shapes match them. Deliberate differences, all on inputs where SGLang misbehaves:

- token ids outside ``[0, vocab_size)``, an empty prompt inside a batch, ``top_logprobs_num`` above the vocabulary
  size, and a prompt longer than the context get a 400 naming the item (SGLang crashes or answers garbage);
- unknown request / sampling keys get a 400 naming them (SGLang ignores unknown request keys, so a typo such as
  ``logprob_start_length`` would silently change what is returned);
- ``text``, ``stream``, string stops, penalties and grammars get a 400 saying they are unsupported (this engine,
  like SGLang with ``--skip-tokenizer-init``, serves token ids only);
- ``sampling_seed`` is honoured (SGLang ignores it unless ``--enable-deterministic-inference``).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from .types import SAMPLING_EPS, TOP_K_ALL, SamplingSpec, SeqRequest, SeqResult

# Top-level keys we implement.
_REQUEST_KEYS = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
                 "token_ids_logprob", "rid", "text", "input_embeds", "stream"}
# SGLang keys accepted only at their default (falsy) value: they change nothing we compute.
_REQUEST_KEYS_DEFAULT_ONLY = {"return_text_in_logprobs", "log_metrics", "return_hidden_states", "lora_path",
                              "custom_logit_processor", "data_parallel_rank", "routed_dp_rank", "priority",
                              "session_params", "session_id", "return_routed_experts", "return_entropy",
                              "image_data", "video_data", "audio_data", "modalities", "extra_key", "cache_salt"}
_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "min_new_tokens", "stop_token_ids",
                  "ignore_eos", "n", "sampling_seed"}
# Text-shaping flags: meaningless without a tokenizer, accepted with any value (as SGLang does).
_SAMPLING_KEYS_IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                          "stream_interval", "custom_params"}
# Accepted only at SGLang's default; anything else is refused (``None`` in the table = must be absent/null).
_SAMPLING_KEYS_DEFAULT_ONLY = {"stop": None, "stop_regex": None, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                               "repetition_penalty": 1.0, "json_schema": None, "regex": None, "ebnf": None,
                               "structural_tag": None, "logit_bias": None}


class ProtocolError(Exception):
    """A request the engine refuses. ``body`` is exactly what SGLang would send for this kind of error."""

    def __init__(self, message: str, *, status: int = 400, validation: bool = False, loc: tuple = ("body",),
                 kind: str = "value_error", value: Any = None):
        super().__init__(message)
        self.status = status
        if validation:
            # FastAPI/pydantic shape, used by SGLang for malformed JSON and wrong types.
            shown = repr(value)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            detail = f"{{'type': '{kind}', 'loc': {loc!r}, 'msg': {message!r}, 'input': {shown}}}"
            self.body = {"object": "error", "message": f"1 validation error:\n  {detail}\n\n  POST /generate",
                         "type": "Bad Request", "param": None, "code": status}
        else:
            self.body = {"error": {"message": message}}


@dataclass
class ModelLimits:
    """What request validation needs to know about the served model."""

    vocab_size: int
    max_context: int          # prompt + new tokens must fit (max_position_embeddings)


@dataclass
class ParsedRequest:
    is_single: bool           # single prompt and n == 1: the response is an object, else a list
    rids: list[str]           # one per returned object (prompt-major, n samples per prompt)
    seqs: list[SeqRequest]


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------

def _type_error(field: str, msg: str, value: Any) -> ProtocolError:
    return ProtocolError(f"Value error, {msg}", validation=True, loc=("body", field), value=value)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        pos = getattr(exc, "pos", 0)
        raise ProtocolError("JSON decode error", validation=True, kind="json_invalid", loc=("body", pos),
                            value={}) from exc
    if not isinstance(body, dict):
        raise ProtocolError("Input should be a valid dictionary or object to extract fields from",
                            validation=True, kind="model_attributes_type", value=body)
    return body


def _check_top_level_keys(body: dict) -> None:
    unknown = sorted(set(body) - _REQUEST_KEYS - _REQUEST_KEYS_DEFAULT_ONLY)
    if unknown:
        raise ProtocolError(f"Unknown request field(s) {unknown}. This engine serves SGLang's /generate subset: "
                            f"{sorted(_REQUEST_KEYS - {'text', 'input_embeds', 'stream'})}.")
    for key in sorted(_REQUEST_KEYS_DEFAULT_ONLY & set(body)):
        value = body[key]
        harmless = value in (None, False, 0, [], {}, "") or (key == "log_metrics" and value is True)
        if not harmless:
            raise ProtocolError(f"'{key}' is not supported by the opd CPU engine; remove it from the request.")
    if body.get("stream"):
        raise ProtocolError("stream=true is not supported by the opd CPU engine; send stream=false.")
    if body.get("text") is not None or body.get("input_embeds") is not None:
        if body.get("input_ids") is None:
            raise ProtocolError("The opd CPU engine serves token ids only (like SGLang with --skip-tokenizer-init): "
                                "send 'input_ids' instead of 'text'/'input_embeds'.")
        raise ProtocolError("Either text, input_ids or input_embeds should be provided.")


def _parse_input_ids(value: Any) -> tuple[bool, list[list[int]]]:
    """Returns (is_single, prompts). Type errors use the FastAPI shape, value errors SGLang's."""
    if value is None:
        raise ProtocolError("Either text, input_ids or input_embeds should be provided.")
    if not isinstance(value, list):
        raise _type_error("input_ids", f"must be list or null; got {type(value).__name__}", value)
    if len(value) == 0:
        raise ProtocolError("input_ids cannot be empty.")
    if all(_is_int(x) for x in value):
        return True, [value]
    if all(isinstance(x, list) for x in value):
        for i, item in enumerate(value):
            if not all(_is_int(x) for x in item):
                raise _type_error("input_ids", f"input_ids[{i}] must be a list of integers", item)
        return False, value
    raise _type_error("input_ids", "must be a list of integers or a list of lists of integers", value)


def _per_item(body: dict, key: str, batch: int, default: Any, *, nested_list: bool = False) -> list:
    """Broadcast a scalar (or, with nested_list, a flat list) field to one value per prompt."""
    value = body.get(key)
    if value is None:
        return [default] * batch
    is_per_item = isinstance(value, list) and (not nested_list or (value and isinstance(value[0], list)))
    if key == "sampling_params":
        is_per_item = isinstance(value, list)
    if not is_per_item:
        return [value] * batch
    if len(value) != batch:
        raise ProtocolError(f"'{key}' is a list of {len(value)} items but the batch has {batch} prompts: give one "
                            f"value per prompt, or a single value for all.")
    return list(value)


def _check_in_vocab(ids: list, what: str, vocab_size: int) -> None:
    for pos, x in enumerate(ids):
        if not (_is_int(x) and 0 <= x < vocab_size):
            raise ProtocolError(f"{what}[{pos}] = {x!r} is not a valid token id: ids must be integers in "
                                f"[0, {vocab_size}) for this model (vocab_size {vocab_size}). Real SGLang crashes "
                                f"or returns another token's score on such ids; validate ids before sending.")


def _number(sp: dict, key: str, default: float) -> float:
    value = sp.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"sampling_params.{key} must be a number, got {value!r}.")
    return float(value)


def _integer(sp: dict, key: str, default: int | None) -> int | None:
    value = sp.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise ProtocolError(f"sampling_params.{key} must be an integer, got {value!r}.")
    return value


def _check_sampling_keys(sp: dict) -> None:
    unknown = sorted(set(sp) - _SAMPLING_KEYS - _SAMPLING_KEYS_IGNORED - set(_SAMPLING_KEYS_DEFAULT_ONLY))
    if unknown:
        raise ProtocolError(f"Unknown sampling_params field(s) {unknown}; supported: {sorted(_SAMPLING_KEYS)}.")
    for key, default in _SAMPLING_KEYS_DEFAULT_ONLY.items():
        value = sp.get(key, default)
        if value not in (default, None, [], ""):
            if key in ("stop", "stop_regex"):
                raise ProtocolError(f"{key}={value!r} is unavailable when skip_tokenizer_init=True (requires "
                                    f"tokenizer to decode tokens to text for matching). Use stop_token_ids.")
            raise ProtocolError(f"sampling_params.{key}={value!r} is not supported by the opd CPU engine.")


def parse_sampling_params(sp: Any) -> tuple[SamplingSpec, int]:
    """SGLang's SamplingParams defaults, greedy normalisation and ``verify()`` checks. Returns (spec, n)."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise _type_error("sampling_params", "must be an object or a list of objects", sp)
    _check_sampling_keys(sp)
    temperature, top_p = _number(sp, "temperature", 1.0), _number(sp, "top_p", 1.0)
    min_p = _number(sp, "min_p", 0.0)
    top_k = _integer(sp, "top_k", -1)
    max_new, min_new = _integer(sp, "max_new_tokens", 128), _integer(sp, "min_new_tokens", 0)
    n, seed = _integer(sp, "n", 1), _integer(sp, "sampling_seed", None)
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(x) for x in stop_ids):
        raise ProtocolError(f"sampling_params.stop_token_ids must be a list of integers, got {stop_ids!r}.")
    if 0 <= temperature < SAMPLING_EPS:
        temperature, top_k = 1.0, 1
    top_k = TOP_K_ALL if top_k == -1 else top_k
    if not math.isfinite(temperature) or temperature < 0.0:
        raise ProtocolError(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ProtocolError(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise ProtocolError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1:
        raise ProtocolError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if min_new < 0:
        raise ProtocolError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new}.")
    if max_new < 0:
        raise ProtocolError(f"max_new_tokens must be at least 0, got {max_new}.")
    if min_new > max_new:
        raise ProtocolError(f"min_new_tokens must be in [0, max_new_tokens({max_new})], got {min_new}.")
    if n < 1:
        raise ProtocolError(f"sampling_params.n must be at least 1, got {n}.")
    spec = SamplingSpec(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                        min_new_tokens=min_new, stop_token_ids=frozenset(stop_ids),
                        ignore_eos=bool(sp.get("ignore_eos") or False), seed=seed)
    return spec, n


def _logprob_options(body: dict, batch: int, prompts: list[list[int]], limits: ModelLimits) -> list[tuple]:
    """Per prompt: (return_logprob, logprob_start_len, top_logprobs_num, token_ids_logprob)."""
    ret = _per_item(body, "return_logprob", batch, False)
    start = _per_item(body, "logprob_start_len", batch, -1)
    topn = _per_item(body, "top_logprobs_num", batch, 0)
    tids = _per_item(body, "token_ids_logprob", batch, None, nested_list=True)
    out = []
    for i, ids in enumerate(prompts):
        r, k, t, tid = bool(ret[i]), start[i], topn[i], tids[i] or None
        if not _is_int(k) or not _is_int(t):
            raise _type_error("logprob_start_len" if not _is_int(k) else "top_logprobs_num",
                              "must be an integer or a list of integers", k if not _is_int(k) else t)
        if r and k > len(ids):
            raise ProtocolError(f"req.logprob_start_len={k} is higher than the number of input tokens "
                                f"len(req.origin_input_ids)={len(ids)}. Please use a smaller logprob_start_len.")
        if k < -1:
            raise ProtocolError(f"logprob_start_len must be -1 (no prompt log-probs) or >= 0, got {k}.")
        if not 0 <= t <= limits.vocab_size:
            raise ProtocolError(f"top_logprobs_num must be in [0, vocab_size={limits.vocab_size}], got {t}.")
        if tid is not None:
            if not isinstance(tid, list):
                raise _type_error("token_ids_logprob", "must be a list of integers or a list of lists", tid)
            _check_in_vocab(tid, "token_ids_logprob", limits.vocab_size)
        out.append((r, k, t if r else 0, tid if r else None))
    return out


def parse_generate_request(body: dict, limits: ModelLimits) -> ParsedRequest:
    """Validate one ``/generate`` body and expand it into per-sequence requests (prompt-major)."""
    _check_top_level_keys(body)
    is_single, prompts = _parse_input_ids(body.get("input_ids"))
    batch = len(prompts)
    sps = _per_item(body, "sampling_params", batch, None)
    parsed = [parse_sampling_params(sp) for sp in sps]
    if len({n for _, n in parsed}) > 1:
        raise ProtocolError("The parallel_sample_num should be the same for all samples in sample params.")
    n = parsed[0][1]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ProtocolError(f"input_ids[{i}] is empty: every prompt of a batch needs at least one token.")
        _check_in_vocab(ids, "input_ids" if is_single else f"input_ids[{i}]", limits.vocab_size)
        if len(ids) > limits.max_context:
            raise ProtocolError(f"input_ids{'' if is_single else f'[{i}]'} has {len(ids)} tokens, more than the "
                                f"model's maximum context length of {limits.max_context} tokens.")
        explicit = isinstance(sps[i], dict) and sps[i].get("max_new_tokens") is not None
        if not explicit:   # SGLang's default 128 is cut at the context length instead of being an error
            spec = parsed[i][0]
            parsed[i] = (replace(spec, max_new_tokens=min(spec.max_new_tokens, limits.max_context - len(ids)),
                                 min_new_tokens=min(spec.min_new_tokens, limits.max_context - len(ids))), n)
        total = len(ids) + parsed[i][0].max_new_tokens
        if total > limits.max_context:
            raise ProtocolError(f"Requested token count exceeds the model's maximum context length of "
                                f"{limits.max_context} tokens. You requested a total of {total} tokens: {len(ids)} "
                                f"tokens from the input messages and {parsed[i][0].max_new_tokens} tokens for the "
                                f"completion. Please reduce the number of tokens in the input messages or the "
                                f"completion to fit within the limit.")
    options = _logprob_options(body, batch, prompts, limits)
    rids = _request_ids(body.get("rid"), batch, n, is_single)
    seqs = []
    for i, ids in enumerate(prompts):
        spec = parsed[i][0]
        ret, start, topn, tids = options[i]
        for j in range(n):
            seed = None if spec.seed is None else (spec.seed * 1_000_003 + j) % (1 << 63)
            seqs.append(SeqRequest(input_ids=list(ids), sampling=replace(spec, seed=seed), return_logprob=ret,
                                   logprob_start_len=start, top_logprobs_num=topn, token_ids_logprob=tids,
                                   prefill_key=i))
    return ParsedRequest(is_single=is_single and n == 1, rids=rids, seqs=seqs)


def _request_ids(rid: Any, batch: int, n: int, is_single: bool) -> list[str]:
    total = batch * n
    if rid is None:
        return [uuid.uuid4().hex for _ in range(total)]
    if isinstance(rid, str):
        return [rid] if total == 1 and is_single else [f"{rid}_{i}" for i in range(total)]
    if isinstance(rid, list) and len(rid) == batch and all(isinstance(r, str) for r in rid):
        return [r if n == 1 else f"{r}_{j}" for r in rid for j in range(n)]
    raise ProtocolError("The rid should be a string or a list of strings (one per prompt).")


# ----------------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------------

def _triples(values: list, ids: list) -> list:
    return [[v, i, None] for v, i in zip(values, ids)]


def _logprob_fields(seq: SeqRequest, res: SeqResult) -> dict:
    n_out = len(res.output_ids)
    inputs = seq.input_ids[seq.logprob_start_len:] if seq.logprob_start_len >= 0 else []
    meta = {"input_token_logprobs": _triples(res.input_logprobs, inputs),
            "output_token_logprobs": _triples(res.output_logprobs, res.output_ids),
            "output_token_logprobs_length": n_out}
    if seq.top_logprobs_num > 0:
        meta["input_top_logprobs"] = [None if t is None else _triples(*t) for t in res.input_top]
        meta["output_top_logprobs"] = [_triples(*t) for t in res.output_top]
    if seq.token_ids_logprob:
        tids = seq.token_ids_logprob
        meta["input_token_ids_logprobs"] = [None if v is None else _triples(v, tids) for v in res.input_token_ids]
        meta["output_token_ids_logprobs"] = [_triples(v, tids) for v in res.output_token_ids]
    return meta


def build_meta_info(rid: str, seq: SeqRequest, res: SeqResult, started: float) -> dict:
    """``meta_info`` with SGLang 0.5.23's keys, in its order."""
    n_out = len(res.output_ids)
    meta: dict[str, Any] = {"id": rid, "finish_reason": res.finish_reason, "prompt_tokens": len(seq.input_ids),
                            "weight_version": res.weight_version, "num_retractions": 0}
    if seq.return_logprob:
        meta.update(_logprob_fields(seq, res))
    now = time.time()
    meta.update({"reasoning_tokens": 0, "completion_tokens": n_out, "cached_tokens": res.cached_tokens,
                 "weight_versions": [{"version": res.weight_version, "start": 0, "end": n_out}],
                 "cached_tokens_details": ({"device": res.cached_tokens, "host": 0} if res.cached_tokens else None),
                 "dp_rank": None, "e2e_latency": now - started, "response_sent_to_client_ts": now})
    return meta


def build_generate_response(parsed: ParsedRequest, results: list[SeqResult], started: float) -> dict | list:
    out = [{"output_ids": res.output_ids, "meta_info": build_meta_info(rid, seq, res, started)}
           for rid, seq, res in zip(parsed.rids, parsed.seqs, results)]
    return out[0] if parsed.is_single else out
