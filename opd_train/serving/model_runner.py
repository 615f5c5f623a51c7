"""The tensor side of the CPU engine: an HF transformers causal LM, batched prefill and KV-cached decoding.

Batches are left-padded (``attention_mask`` zeros on the left, ``position_ids = cumsum(mask) - 1``), so every row's
next-token logits sit in the last column. A running :class:`DecodeBatch` can absorb new sequences between steps
(their caches are left-padded to a common length and concatenated: continuous batching), and finished rows are
dropped from the cache as soon as they finish. The ``n`` samples of a prompt share one prefill.

Log-prob conventions are SGLang's (see ``protocol.py``): prompt log-probs at T=1 whatever the request's temperature,
output log-probs of the temperature-scaled distribution.
"""
from __future__ import annotations

import inspect
import json
import os
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

from .sampling import BatchSampler
from .types import SeqRequest, SeqResult
from .weights import apply_state, load_state_from_disk

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class DecodeBatch:
    """Sequences being decoded together. Row r of every tensor belongs to ``seqs[r]``."""

    seqs: list[SeqRequest]
    tags: list[object]                 # caller's handle per row, returned with finished results
    results: list[SeqResult]
    stop_sets: list[frozenset[int]]
    sampler: BatchSampler
    cache: DynamicCache
    attn_mask: torch.Tensor            # (B, S) int64, left-padded
    next_pos: torch.Tensor             # (B, 1) int64 position of the next input token
    logits: torch.Tensor               # (B, V) fp32 next-token logits

    def __len__(self) -> int:
        return len(self.seqs)


def _eos_ids(model_path: str, config) -> frozenset[int]:
    ids: list = []
    for source in (getattr(config, "eos_token_id", None), _generation_config_eos(model_path)):
        if source is not None:
            ids.extend(source if isinstance(source, list) else [source])
    return frozenset(int(i) for i in ids)


def _generation_config_eos(model_path: str):
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("eos_token_id")


class ModelRunner:
    """Owns the model; not thread-safe (the scheduler thread is its only caller)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0,
                 weight_version: str = "default", max_prefill_tokens: int = 16384,
                 max_logits_elements: int = 1 << 27):
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise ModelLoadError(f"--model {model_path!r} is not an HF model directory (no config.json there). "
                                 f"Pass the directory written by save_pretrained / the trainer's HF export.")
        if dtype not in _DTYPES:
            raise ModelLoadError(f"--dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
        self.model_path = model_path
        self.dtype = dtype
        hf_logging.disable_progress_bar()   # a server log is not a terminal
        self.config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype], local_files_only=True)
        self.model.eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(self.config, "max_position_embeddings", 1 << 20))
        self.eos_ids = _eos_ids(model_path, self.config)
        self.generator = torch.Generator().manual_seed(seed)
        self.weight_version = weight_version
        self.max_prefill_tokens = max_prefill_tokens
        self.max_logits_elements = max_logits_elements
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5.2x renamed ``past_key_values`` to ``cache``.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------------------------------------ weights
    def load_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        """Swap in the weights of an HF safetensors directory; on any error the current weights stay."""
        load_state_from_disk(self.model, self.config, model_path)
        self.model_path = model_path
        if weight_version is not None:
            self.weight_version = weight_version

    def load_weights_from_tensors(self, named_tensors: dict[str, torch.Tensor],
                                  weight_version: str | None = None) -> None:
        """Same as :meth:`load_weights_from_disk` for in-process callers that hold the tensors."""
        apply_state(self.model, dict(named_tensors))
        if weight_version is not None:
            self.weight_version = weight_version

    # ------------------------------------------------------------------------------------------------ forward
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache | None,
                 all_logits: bool) -> torch.Tensor:
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None,
                         logits_to_keep=0 if all_logits else 1, **kwargs)
        return out.logits.float()

    @staticmethod
    def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        offsets = []
        for r, p in enumerate(prompts):
            o = width - len(p)
            ids[r, o:] = torch.tensor(p, dtype=torch.long)
            mask[r, o:] = 1
            offsets.append(o)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        return ids, mask, pos, offsets

    def _chunks(self, order: list[int], lengths: list[int], all_logits: bool) -> list[list[int]]:
        """Split ``order`` (sorted by length) into prefill chunks within the token and logits budgets."""
        chunks, current, width = [], [], 0
        for i in order:
            w = max(width, lengths[i])
            tokens = w * (len(current) + 1)
            logits = tokens * self.vocab_size if all_logits else (len(current) + 1) * self.vocab_size
            if current and (tokens > self.max_prefill_tokens or logits > self.max_logits_elements):
                chunks.append(current)
                current, w = [], lengths[i]
            current.append(i)
            width = w
        if current:
            chunks.append(current)
        return chunks

    # ------------------------------------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, seqs: list[SeqRequest]) -> list[SeqResult]:
        """Prefill-only requests (``max_new_tokens == 0``): prompt log-probs and SGLang's one-entry output tops."""
        results = [SeqResult(finish_reason={"type": "length", "length": 0}, weight_version=self.weight_version)
                   for _ in seqs]
        lengths = [len(s.input_ids) for s in seqs]
        cuts = [_cache_cut(s) for s in seqs]
        # Rows sharing a cacheable prefix stay adjacent (one chunk), then by length to limit padding.
        order = sorted(range(len(seqs)), key=lambda i: (cuts[i], seqs[i].input_ids[:cuts[i]], lengths[i]))
        for chunk in self._chunks(order, lengths, any(seqs[i].wants_input_logprobs for i in order)):
            batch = [seqs[i] for i in chunk]
            logits, offsets, cached = self._score_forward(batch, [cuts[i] for i in chunk])
            out = [results[i] for i in chunk]
            self._fill_input_logprobs(logits, offsets, batch, out)
            last = torch.tensor([o + len(s.input_ids) - 1 for o, s in zip(offsets, batch)])
            self._fill_output_tops(logits[torch.arange(len(batch)), last], batch, out,
                                   BatchSampler([s.sampling for s in batch], self.vocab_size, self.generator))
            for res, c in zip(out, cached):
                res.cached_tokens = c
        return results

    def _score_forward(self, batch: list[SeqRequest], cuts: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Logits for a scoring chunk: (logits [b, W, V], offsets, cached_tokens); position p of row r is at column
        ``offsets[r] + p``. Rows that share the prefix ``ids[:cut]`` (no logits needed there: the n samples of a
        prompt scored with logprob_start_len = prompt_len - 1) run that prefix once and continue from its KV cache,
        like SGLang's radix cache; otherwise one left-padded forward."""
        unique: dict[tuple, int] = {}
        rows = [unique.setdefault(tuple(s.input_ids[:c]), len(unique)) for s, c in zip(batch, cuts)]
        lengths = [len(s.input_ids) for s in batch]
        plain = len(batch) * max(lengths)
        shared = len(unique) * max(cuts) + len(batch) * max(n - c for n, c in zip(lengths, cuts))
        if min(cuts) == 0 or shared > 0.8 * plain:
            ids, mask, pos, offsets = self._left_pad([s.input_ids for s in batch])
            all_logits = any(s.wants_input_logprobs for s in batch)
            logits = self._forward(ids, mask, pos, None, all_logits=all_logits)
            if not all_logits:
                offsets = [1 - n for n in lengths]            # the one kept column is position n - 1
            return logits, offsets, [0] * len(batch)
        pids, pmask, ppos, _ = self._left_pad([list(k) for k in unique])
        cache = DynamicCache(config=self.config)
        self._forward(pids, pmask, ppos, cache, all_logits=False)
        index = torch.tensor(rows, dtype=torch.long)
        cache.batch_select_indices(index)
        width = max(n - c for n, c in zip(lengths, cuts))
        sids = torch.zeros(len(batch), width, dtype=torch.long)
        smask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (s, c) in enumerate(zip(batch, cuts)):          # suffixes right-padded: pads only follow
            sids[r, :lengths[r] - c] = torch.tensor(s.input_ids[c:], dtype=torch.long)
            smask[r, :lengths[r] - c] = 1
        pos = torch.tensor(cuts, dtype=torch.long).unsqueeze(1) + torch.arange(width).unsqueeze(0)
        logits = self._forward(sids, torch.cat([pmask[index], smask], dim=1), pos, cache, all_logits=True)
        counts = Counter(rows)
        return logits, [-c for c in cuts], [c if counts[row] > 1 else 0 for c, row in zip(cuts, rows)]

    def _fill_input_logprobs(self, logits: torch.Tensor, offsets: list[int], seqs: list[SeqRequest],
                             results: list[SeqResult]) -> None:
        """Prompt log-probs at T=1. Entry j >= 1 of row r is log p(ids[K+j] | ids[:K+j]), at logits column
        offset + K + j - 1; entry 0 is None (SGLang's convention)."""
        width, vocab = logits.shape[1], logits.shape[2]
        rows, flat, targets = [], [], []
        for r, seq in enumerate(seqs):
            if not seq.return_logprob or seq.logprob_start_len < 0:
                continue
            start, n = seq.logprob_start_len, len(seq.input_ids)
            rows.append((r, len(flat), n - start - 1))          # (row, first flat index, entries after the null)
            flat.extend(r * width + offsets[r] + p for p in range(start, n - 1))
            targets.extend(seq.input_ids[start + 1:])
        if not rows:
            return
        x = logits.reshape(-1, vocab)[torch.tensor(flat, dtype=torch.long)]                 # (N, V)
        lse = torch.logsumexp(x, dim=-1, keepdim=True)                                       # (N, 1)
        lp = (x.gather(1, torch.tensor(targets, dtype=torch.long).unsqueeze(1)) - lse).squeeze(1).tolist()
        kmax = max(seqs[r].top_logprobs_num for r, _, _ in rows)
        tops = _topk_lists(x - lse, kmax) if kmax else None
        for r, first, count in rows:
            seq, res = seqs[r], results[r]
            if len(seq.input_ids) == seq.logprob_start_len:
                continue                                          # start == len: no entries at all
            res.input_logprobs = [None] + lp[first:first + count]
            if seq.top_logprobs_num:
                k = seq.top_logprobs_num
                res.input_top = [None] + [(v[:k], i[:k]) for v, i in tops[first:first + count]]
            if seq.token_ids_logprob:
                sel = x[first:first + count][:, seq.token_ids_logprob] - lse[first:first + count]
                res.input_token_ids = [None] + sel.tolist()

    def _fill_output_tops(self, last_logits: torch.Tensor, seqs: list[SeqRequest], results: list[SeqResult],
                          sampler: BatchSampler) -> None:
        """SGLang returns one ``output_top_logprobs`` / ``output_token_ids_logprobs`` entry even when
        ``max_new_tokens == 0``: the (temperature-scaled) next-token distribution after the prompt."""
        if not any(s.return_logprob and (s.top_logprobs_num or s.token_ids_logprob) for s in seqs):
            return
        logprobs = sampler.log_probs(last_logits)
        kmax = max(s.top_logprobs_num for s in seqs)
        tops = _topk_lists(logprobs, kmax) if kmax else None
        for r, (seq, res) in enumerate(zip(seqs, results)):
            if not seq.return_logprob:
                continue
            if seq.top_logprobs_num:
                v, i = tops[r]
                res.output_top = [(v[:seq.top_logprobs_num], i[:seq.top_logprobs_num])]
            if seq.token_ids_logprob:
                res.output_token_ids = [logprobs[r, seq.token_ids_logprob].tolist()]

    # ------------------------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def prefill(self, seqs: list[SeqRequest], tags: list[object]) -> DecodeBatch:
        """Prefill sequences that will generate; the n samples of one prompt (same ``prefill_key`` and ids) share
        one prefill row whose cache is then repeated."""
        unique: dict[tuple, int] = {}
        rows = []
        for s in seqs:
            key = (s.prefill_key, tuple(s.input_ids))
            rows.append(unique.setdefault(key, len(unique)))
        prompts = [list(k[1]) for k in unique]
        ids, mask, pos, offsets = self._left_pad(prompts)
        cache = DynamicCache(config=self.config)
        need_all = any(s.wants_input_logprobs for s in seqs)
        logits = self._forward(ids, mask, pos, cache, all_logits=need_all)
        results = [SeqResult(weight_version=self.weight_version) for _ in seqs]
        if need_all:
            self._fill_input_logprobs(logits[rows], [offsets[r] for r in rows], seqs, results)
        index = torch.tensor(rows, dtype=torch.long)
        if len(rows) != len(prompts) or rows != list(range(len(rows))):
            cache.batch_select_indices(index)
        # Like SGLang's n > 1 prefix warm-up: the samples of a prompt report its prefix as cached.
        shared = Counter(rows)
        for res, row, s in zip(results, rows, seqs):
            res.cached_tokens = len(s.input_ids) - 1 if shared[row] > 1 else 0
        stop_sets = [frozenset() if s.sampling.ignore_eos else s.sampling.stop_token_ids | self.eos_ids
                     for s in seqs]
        return DecodeBatch(seqs=list(seqs), tags=list(tags), results=results, stop_sets=stop_sets,
                           sampler=BatchSampler([s.sampling for s in seqs], self.vocab_size, self.generator),
                           cache=cache, attn_mask=mask[index], next_pos=mask.sum(-1, keepdim=True)[index],
                           logits=logits[index, -1])

    @torch.inference_mode()
    def decode_step(self, batch: DecodeBatch) -> list[tuple[object, SeqResult]]:
        """Sample one token for every row, retire finished rows, run the model on the survivors."""
        logits = self._mask_early_stops(batch)
        logprobs = batch.sampler.log_probs(logits)
        tokens = batch.sampler.sample(logits, logprobs)                                        # (B,)
        tok_lp = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        kmax = max((s.top_logprobs_num for s in batch.seqs if s.return_logprob), default=0)
        tops = _topk_lists(logprobs, kmax) if kmax else None
        finished, keep = [], []
        for r, (seq, res, token) in enumerate(zip(batch.seqs, batch.results, tokens.tolist())):
            res.output_ids.append(token)
            if seq.return_logprob:
                res.output_logprobs.append(tok_lp[r])
                if seq.top_logprobs_num:
                    v, i = tops[r]
                    res.output_top.append((v[:seq.top_logprobs_num], i[:seq.top_logprobs_num]))
                if seq.token_ids_logprob:
                    res.output_token_ids.append(logprobs[r, seq.token_ids_logprob].tolist())
            # SGLang checks the length limit before stop tokens.
            if len(res.output_ids) >= seq.sampling.max_new_tokens:
                res.finish_reason = {"type": "length", "length": seq.sampling.max_new_tokens}
            elif token in batch.stop_sets[r]:
                res.finish_reason = {"type": "stop", "matched": token}
            else:
                keep.append(r)
                continue
            res.weight_version = self.weight_version
            finished.append((batch.tags[r], res))
        if len(keep) != len(batch):
            _select_rows(batch, keep)
        if keep:
            self._step_model(batch, tokens[keep] if len(keep) != len(tokens) else tokens)
        return finished

    def _mask_early_stops(self, batch: DecodeBatch) -> torch.Tensor:
        """min_new_tokens: stop tokens get -inf until enough tokens exist (applied before the log-softmax,
        like SGLang's min-new-tokens penalizer)."""
        logits = batch.logits
        for r, seq in enumerate(batch.seqs):
            if len(batch.results[r].output_ids) < seq.sampling.min_new_tokens and batch.stop_sets[r]:
                if logits is batch.logits:
                    logits = logits.clone()
                logits[r, list(batch.stop_sets[r])] = float("-inf")
        return logits

    def _step_model(self, batch: DecodeBatch, tokens: torch.Tensor) -> None:
        batch.attn_mask = torch.cat([batch.attn_mask, torch.ones_like(batch.next_pos)], dim=1)
        logits = self._forward(tokens.unsqueeze(1), batch.attn_mask, batch.next_pos, batch.cache, all_logits=False)
        batch.next_pos = batch.next_pos + 1
        batch.logits = logits[:, -1]

    @staticmethod
    def can_merge(batch: DecodeBatch) -> bool:
        return all(type(layer).__name__ == "DynamicLayer" for layer in batch.cache.layers)

    @torch.inference_mode()
    def merge(self, batch: DecodeBatch, other: DecodeBatch) -> None:
        """Append ``other``'s rows to ``batch`` (continuous batching): left-pad both caches to one length."""
        width = max(batch.attn_mask.shape[1], other.attn_mask.shape[1])
        for a, b in zip(batch.cache.layers, other.cache.layers):
            a.keys = torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)], dim=0)
            a.values = torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)], dim=0)
        batch.attn_mask = torch.cat([_pad_left(batch.attn_mask, width, 1), _pad_left(other.attn_mask, width, 1)])
        batch.next_pos = torch.cat([batch.next_pos, other.next_pos])
        batch.logits = torch.cat([batch.logits, other.logits])
        batch.seqs += other.seqs
        batch.tags += other.tags
        batch.results += other.results
        batch.stop_sets += other.stop_sets
        batch.sampler.extend(other.sampler)


def _cache_cut(seq: SeqRequest) -> int:
    """Positions before this one need no logits (only KV): logprob_start_len, or all but the last position."""
    n = len(seq.input_ids)
    return min(seq.logprob_start_len, n - 1) if seq.wants_input_logprobs else n - 1


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _select_rows(batch: DecodeBatch, keep: list[int]) -> None:
    """Drop finished rows everywhere, then drop cache columns that no remaining row attends to."""
    batch.seqs = [batch.seqs[r] for r in keep]
    batch.tags = [batch.tags[r] for r in keep]
    batch.results = [batch.results[r] for r in keep]
    batch.stop_sets = [batch.stop_sets[r] for r in keep]
    if not keep:
        return
    index = torch.tensor(keep, dtype=torch.long)
    batch.sampler.select(index)
    batch.cache.batch_select_indices(index)
    batch.attn_mask, batch.next_pos, batch.logits = batch.attn_mask[index], batch.next_pos[index], batch.logits[index]
    used = batch.attn_mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    if first > 0 and all(type(layer).__name__ == "DynamicLayer" for layer in batch.cache.layers):
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        batch.attn_mask = batch.attn_mask[:, first:]


def _topk_lists(logprobs: torch.Tensor, k: int) -> list[tuple[list[float], list[int]]]:
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return list(zip(values.tolist(), ids.tolist()))
