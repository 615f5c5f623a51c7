"""Per-step latency of the CPU engine for the default CPU experiment's shape.

    python -m opd_train.serving.bench [--prompts 64] [--n 4] [--new-tokens 5] [--vocab 20] [--steps 20]

Builds a tiny random Qwen3 student (hidden 64, 2 layers) and teacher (hidden 128, 4 layers), serves each from its
own engine subprocess (as the driver does), and times what one OPD rollout step asks of them:
1. ``generate``: ONE batched request, ``prompts`` x ``n`` samples of ``new-tokens`` tokens (student), and the same
   as one concurrent call per prompt group (coalesced by the client into a few requests);
2. ``teacher per-sample``: every sample scored by its own concurrent request (``reward_func``'s pattern), with the
   teacher's full distribution (``top_logprobs_num = vocab``) for the exact-KL mode;
3. ``teacher batched``: the same scoring in one request (``post_process_rewards``'s pattern);
4. ``weight sync``: ``update_weights_from_disk`` of the student from an HF safetensors directory.
Numbers depend on what else runs on the machine; report them with the command line.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import torch

from ..rollout.engines import SamplingParams, SGLangEngine, launch_cpu_engine
from ..teacher import SGLangTeacher, SGLangTeacherConfig


def _tiny_qwen3(path: str, vocab: int, hidden: int, layers: int, seed: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1e4)
    Qwen3ForCausalLM(cfg).save_pretrained(path)


def _time(fn, steps: int) -> list[float]:
    fn()                                               # warm-up (first-call allocations, lazy imports)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _report(name: str, times: list[float]) -> str:
    ms = sorted(t * 1e3 for t in times)
    return f"{name:<34} median {statistics.median(ms):8.1f} ms   min {ms[0]:8.1f}   max {ms[-1]:8.1f}"


def run(args: argparse.Namespace) -> list[str]:
    work = tempfile.mkdtemp(prefix="opd-bench-")
    _tiny_qwen3(f"{work}/student", args.vocab, 64, 2, 0)
    _tiny_qwen3(f"{work}/teacher", args.vocab, 128, 4, 1)
    _tiny_qwen3(f"{work}/student_v2", args.vocab, 64, 2, 2)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    student = launch_cpu_engine(f"{work}/student", num_threads=args.threads)
    teacher_srv = launch_cpu_engine(f"{work}/teacher", num_threads=args.threads)
    lines = []
    try:
        eng = SGLangEngine(server=student, vocab_size=args.vocab)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
        lines.append(_report(f"generate {args.prompts}x{args.n}x{args.new_tokens} tok",
                             _time(lambda: eng.generate(prompts, params, n=args.n), args.steps)))

        async def per_group():                       # the rollout manager's pattern: one call per prompt group
            return await asyncio.gather(*(eng.agenerate([p], params, n=args.n) for p in prompts))

        lines.append(_report(f"generate per-group x{args.prompts} calls", _time(lambda: asyncio.run(per_group()),
                                                                              args.steps)))
        groups = eng.generate(prompts, params, n=args.n)
        items = [(g.prompt_ids + g.output_ids, len(g.output_ids)) for grp in groups for g in grp]
        teacher = SGLangTeacher(SGLangTeacherConfig(url=teacher_srv.url, vocab_size=args.vocab,
                                                    top_logprobs_num=args.vocab, concurrency=args.concurrency))

        async def per_sample():
            return await asyncio.gather(*(teacher.ascore(t, r) for t, r in items))

        lines.append(_report(f"teacher per-sample x{len(items)} (top{args.vocab})",
                             _time(lambda: asyncio.run(per_sample()), args.steps)))
        lines.append(_report(f"teacher batched x{len(items)} (top{args.vocab})",
                             _time(lambda: asyncio.run(teacher.ascore_many(items)), args.steps)))
        dirs = [f"{work}/student_v2", f"{work}/student"]
        lines.append(_report("weight sync (update_weights_from_disk)",
                             _time(lambda: eng.update_weights_from_disk(dirs[0] if eng.http.stats.requests % 2
                                                                        else dirs[1]), args.steps)))
        teacher.close()
        eng.http.close()
    finally:
        student.stop()
        teacher_srv.stop()
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_train.serving.bench", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=5)
    p.add_argument("--vocab", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args(argv)
    for line in run(args):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
