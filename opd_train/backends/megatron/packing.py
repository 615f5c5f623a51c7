"""Training batches and their packing into variable-length micro-batches.

A :class:`TrainBatch` is plain data: per-sample token lists (prompt + response), response lengths and loss
masks. :func:`pack_microbatches` packs whole samples into rows of at most ``max_tokens`` tokens (first-fit
decreasing); each micro-batch is ONE row (batch dimension 1), so no padding is spent.

Attention inside a packed row stays within each sample:
- local layer spec (CPU): a block-diagonal causal boolean mask [1, 1, S, S] (True = masked out) and
  position ids that restart at 0 for every sample (used by ``model.PackedGPTModel`` for RoPE);
- TransformerEngine spec (GPU): THD ``PackedSeqParams`` with the cumulative sequence lengths, no mask.

Scoring rows. The log-prob of response token j of a sample is read from the logits of position j-1, so the
sample occupying row positions [o, o+n) with response length R is scored at rows [o+n-R-1, o+n-1) against
targets ``tokens[o+n-R : o+n]``. ``MicroBatch.targets`` holds those targets at the scoring rows and
``IGNORE_INDEX`` elsewhere, so one call of ``opd_kernels.token_logprobs`` over the whole row gives every
response log-prob with no gather or copy of the logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class TrainBatch:
    """One data-parallel rank's share of a training batch (all TP ranks of a group get the same one).

    tokens: per sample, prompt ids followed by response ids.
    response_lengths: per sample, the number of response ids at the end of ``tokens`` (>= 1).
    loss_masks: per sample, ``response_length`` 0/1 flags (1 = trainable token); None = all ones.
    """
    tokens: list[list[int]]
    response_lengths: list[int]
    loss_masks: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_samples(cls, samples) -> "TrainBatch":
        """Build from ``opd_train.types.Sample`` objects (tokens, response_length, loss_mask)."""
        return cls(tokens=[list(s.tokens) for s in samples],
                   response_lengths=[int(s.response_length) for s in samples],
                   loss_masks=[list(s.get_loss_mask()) for s in samples])

    def mask(self, i: int) -> list[int]:
        return self.loss_masks[i] if self.loss_masks is not None else [1] * self.response_lengths[i]

    def validate(self, vocab_size: int) -> None:
        """Clear ValueError naming the sample and the problem; runs before any model work."""
        if len(self.tokens) == 0:
            raise ValueError("TrainBatch is empty")
        if len(self.response_lengths) != len(self.tokens):
            raise ValueError(f"TrainBatch has {len(self.tokens)} token lists but {len(self.response_lengths)} "
                             "response lengths")
        if self.loss_masks is not None and len(self.loss_masks) != len(self.tokens):
            raise ValueError(f"TrainBatch has {len(self.tokens)} samples but {len(self.loss_masks)} loss masks")
        for i, (toks, r) in enumerate(zip(self.tokens, self.response_lengths)):
            if not 1 <= r < len(toks):
                raise ValueError(f"sample {i}: response_length={r} must be >= 1 and leave >= 1 prompt token "
                                 f"(it has {len(toks)} tokens)")
            if min(toks) < 0 or max(toks) >= vocab_size:
                raise ValueError(f"sample {i}: token ids must lie in [0, {vocab_size}), got "
                                 f"min={min(toks)} max={max(toks)}")
            if len(self.mask(i)) != r:
                raise ValueError(f"sample {i}: loss mask has {len(self.mask(i))} entries, response_length={r}")

    def num_response_tokens(self) -> int:
        """Masked-in response tokens (the ``num_tokens`` normaliser of token-mean losses)."""
        return sum(sum(self.mask(i)) for i in range(len(self)))


@dataclass
class MicroBatch:
    sample_ids: list[int]                   # indices into the TrainBatch, in row order
    input_ids: torch.Tensor                 # [1, S] int64
    position_ids: torch.Tensor              # [1, S] int64, restarting at 0 per sample
    targets: torch.Tensor                   # [S] int64: next response token at scoring rows, else IGNORE_INDEX
    spans: list[tuple[int, int]]            # per sample: scoring rows [start, end) (end - start = response len)
    loss_mask: torch.Tensor                 # [S] float: the sample's loss mask at its scoring rows, else 0
    attention_mask: torch.Tensor | None = None   # [1, 1, S, S] bool, local spec only
    packed_seq_params: object | None = None      # THD PackedSeqParams, TE only
    extras: dict = field(default_factory=dict)   # per-micro-batch data added by the trainer

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def split_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample response-span slices of a per-row tensor ``rows`` [S, ...]."""
        return [rows[a:b] for a, b in self.spans]

    def pad_spans(self, per_sample: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Stack per-sample [R_i] tensors (in this micro-batch's order) into a right-padded [b, R_max]."""
        width = max(t.shape[0] for t in per_sample)
        out = per_sample[0].new_full((len(per_sample), width), fill)
        for i, t in enumerate(per_sample):
            out[i, : t.shape[0]] = t
        return out

    def place(self, per_sample: list[torch.Tensor], fill) -> torch.Tensor:
        """Per-sample [R_i, ...] values (TrainBatch order) at this micro-batch's scoring rows: [S, ...], ``fill``
        elsewhere (what the row kernels read next to ``targets``)."""
        first = per_sample[self.sample_ids[0]]
        out = torch.full((self.num_tokens, *first.shape[1:]), fill, dtype=first.dtype)
        for i, (a, b) in zip(self.sample_ids, self.spans):
            out[a:b] = per_sample[i]
        return out

    def span_mask(self) -> torch.Tensor:
        """[b, R_max] float loss mask (0 on padding) in this micro-batch's sample order."""
        return self.pad_spans(self.split_rows(self.loss_mask))


def plan_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing of sample lengths into bins of ``max_tokens`` (oversized: own bin)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return [sorted(b) for b in bins]


def _block_causal_mask(lengths: list[int]) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(seg.numel())
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def _thd_params(lengths: list[int], device: torch.device):
    from megatron.core.packed_seq_params import PackedSeqParams
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    cu = cu.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths))


def build_microbatch(batch: TrainBatch, sample_ids: list[int], *, thd: bool, device: torch.device) -> MicroBatch:
    ids, pos, targets, mask, spans = [], [], [], [], []
    offset = 0
    for i in sample_ids:
        toks, r = batch.tokens[i], batch.response_lengths[i]
        n = len(toks)
        ids.extend(toks)
        pos.extend(range(n))
        targets.extend([IGNORE_INDEX] * (n - r - 1) + toks[n - r:] + [IGNORE_INDEX])
        mask.extend([0.0] * (n - r - 1) + [float(m) for m in batch.mask(i)] + [0.0])
        spans.append((offset + n - r - 1, offset + n - 1))
        offset += n
    lengths = [len(batch.tokens[i]) for i in sample_ids]
    mb = MicroBatch(sample_ids=list(sample_ids), input_ids=torch.tensor([ids], device=device),
                    position_ids=torch.tensor([pos], device=device), targets=torch.tensor(targets, device=device),
                    spans=spans, loss_mask=torch.tensor(mask, device=device))
    if thd:
        mb.packed_seq_params = _thd_params(lengths, device)
    else:
        mb.attention_mask = _block_causal_mask(lengths).to(device)
    return mb


def pack_microbatches(batch: TrainBatch, max_tokens: int, *, thd: bool = False,
                      device: torch.device | str = "cpu") -> list[MicroBatch]:
    """Pack a batch into micro-batches of at most ``max_tokens`` tokens (see the module docstring)."""
    plan = plan_microbatches([len(t) for t in batch.tokens], max_tokens)
    return [build_microbatch(batch, ids, thd=thd, device=torch.device(device)) for ids in plan]


def unpack(microbatches: list[MicroBatch], per_mb: list[list[torch.Tensor]], num_samples: int):
    """Reorder per-micro-batch per-sample results back to the TrainBatch's sample order."""
    out: list[torch.Tensor | None] = [None] * num_samples
    for mb, results in zip(microbatches, per_mb):
        for i, t in zip(mb.sample_ids, results):
            out[i] = t
    return out
