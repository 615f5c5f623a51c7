"""Provisional CPU timings of the algorithm layer at B=64, T=4096 (run: python tests/algo/bench_algo.py).

One intra-op thread: on the shared 2-core machines, 2 threads made every elementwise op ~100x slower under load.
Not collected by pytest (the name does not start with test_).
"""
import time

import torch

from opd_train.algo import apply_opd, compute_advantages, policy_loss, whiten


def best_ms(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(B=64, T=4096):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    values, rewards, ref_kl = torch.randn(B, T, generator=g), torch.randn(B, generator=g), torch.randn(B, T)
    for est in ("grpo", "ppo", "reinforce_plus_plus"):
        kw = {} if est == "grpo" else dict(ref_kl=ref_kl, kl_coef=0.1)
        if est == "ppo":
            kw["values"] = values
        ms = best_ms(lambda e=est, k=kw: compute_advantages(e, rewards=rewards, response_mask=mask, group_size=8, **k))
        print(f"compute_advantages({est}) B={B} T={T}: {ms:.1f} ms")
    adv, _ = compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=8)
    student, teacher = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    print(f"apply_opd: {best_ms(lambda: apply_opd(adv, student, teacher, response_mask=mask)):.2f} ms")
    print(f"whiten: {best_ms(lambda: whiten(adv, mask)):.2f} ms")

    def step():
        new = student.clone().requires_grad_(True)
        loss, _ = policy_loss(new, student, adv, mask)
        loss.backward()
    print(f"policy_loss forward+backward: {best_ms(step):.2f} ms")


if __name__ == "__main__":
    main()
