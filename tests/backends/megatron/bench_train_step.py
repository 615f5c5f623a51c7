"""Timing of the Megatron backend on CPU (not a test; run by hand, numbers are machine- and load-dependent).

    python tests/backends/megatron/bench_train_step.py [--hidden 256 --layers 4 --vocab 4096 --samples 32]

Reports, for a random Qwen3 of the given size, TP=1 on one process: the old-log-prob forward and one
``train_step`` over a batch of ``--samples`` sequences (prompt 32 + response 64 tokens), packed into
micro-batches of ``--budget`` tokens; and the overhead of the CPU compatibility layer's TorchFunctionMode on
a plain transformers forward+backward of the same model (the mode runs Python code for every torch call).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    import torch
    import transformers
    from opd_train.backends.megatron import (BatchingSettings, MegatronTrainer, ModelSource, TrainBatch,
                                             TrainerSettings, init_distributed)
    from opd_train.backends.megatron.cpu_compat import _CudaToCpuMode
    cfg = transformers.Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                   head_dim=args.hidden // 8, max_position_embeddings=1024)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).float()
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    init_distributed(rank=0, world_size=1, master_port=29590)
    trainer = MegatronTrainer(TrainerSettings(model=ModelSource(hf_path=tmp),
                                              batching=BatchingSettings(max_tokens_per_microbatch=args.budget)))
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(tokens=[torch.randint(0, args.vocab, (96,), generator=g).tolist() for _ in range(args.samples)],
                       response_lengths=[64] * args.samples)
    old = trainer.forward(batch).logprobs
    adv = [torch.randn(64, generator=g) for _ in range(args.samples)]
    fwd = _best(lambda: trainer.forward(batch), args.repeat)
    step = _best(lambda: trainer.train_step(batch, adv, old), args.repeat)
    tokens = sum(len(t) for t in batch.tokens)
    print(f"model hidden={args.hidden} layers={args.layers} vocab={args.vocab}; batch {args.samples} x 96 tokens "
          f"({tokens} tokens), budget {args.budget}, threads {torch.get_num_threads()}")
    print(f"forward (old log-probs): {fwd * 1e3:.0f} ms ({tokens / fwd:.0f} tok/s)")
    print(f"train_step (fwd+bwd+Adam): {step * 1e3:.0f} ms ({tokens / step:.0f} tok/s)")

    ids = torch.tensor(batch.tokens[:8])

    def hf_step():
        hf.zero_grad()
        hf(ids).logits.float().logsumexp(-1).mean().backward()

    plain = _best(hf_step, args.repeat + 2)

    def with_mode():
        with _CudaToCpuMode():
            hf_step()

    moded = _best(with_mode, args.repeat + 2)
    print(f"TorchFunctionMode overhead on a transformers fwd+bwd (8 x 96 tokens): {plain * 1e3:.1f} ms -> "
          f"{moded * 1e3:.1f} ms ({(moded / plain - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
