"""How much of the exact reverse-KL gradient one rollout step's sampled-k1 / top-32 gradient carries, for the
pruned SmolLM2 student of ``opd-train --experiment smollm2`` (run that once first: it builds the models).

Per batch of answers sampled from the student (default 8 prompts x 2 = one rollout step of the experiment), three
gradients w.r.t. every student parameter, all at token mean over the answer tokens:
  k1:    the policy gradient of slime's sampled penalty, -(A * log p_S(y)) with A = -(log p_S(y) - log p_T(y))
         whitened over the batch (what the driver trains with, one optimizer step's worth);
  topk:  the gradient of the top-32 + tail KL (``opd_kernels.topk_kl``);
  exact: the gradient of the exact KL(p_S || p_T) over the 49152-entry vocabulary.
The reference is the exact gradient averaged over all batches. Printed per parameter group (the tied embedding,
attention, MLP, norms, and bands of 7 layers): the cosine with the reference, and the cosine of the signs, which
is what Adam's per-coordinate normalised step follows (its first step is lr * sign(g)).

    .venv/bin/python tools/smollm2_gradient_signal.py [--batches 6] [--prompts 8] [--samples 2]
"""
from __future__ import annotations

import argparse
import os
import re
import time

import torch

import opd_kernels as ok
from opd_train.toy import smollm2, smollm2_eval, smollm2_prompts


def _groups(model, band: int = 7) -> dict[str, list[slice]]:
    """Parameter groups by kind (the tied embedding, attention, MLP, norms) and by bands of ``band`` layers."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        kind = ("embedding" if "embed" in name or "lm_head" in name else "norm" if "norm" in name else
                "attention" if "attn" in name else "mlp")
        layer = re.search(r"layers\.(\d+)\.", name)
        for group in (kind, f"layers {int(layer[1]) // band * band}+" if layer else None):
            if group:
                out.setdefault(group, []).append(slice(offset, offset + p.numel()))
        offset += p.numel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    ap.add_argument("--samples", type=int, default=2, help="answers per prompt")
    ap.add_argument("--cache", default="~/.cache/opd-train/toy", help="--experiment-cache-dir of the experiment")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = os.path.join(os.path.expanduser(args.cache), "smollm2")
    student_dir = os.path.join(root, "smollm2-without-" + "-".join(map(str, smollm2.DROPPED)))
    teacher_dir = os.path.join(root, "smollm2-135m-instruct")
    if not os.path.isdir(student_dir):
        raise SystemExit(f"{student_dir} is missing: run `opd-train --experiment smollm2` once (it builds the models)")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    params = list(student.parameters())
    questions = smollm2_prompts.sample_prompts(args.batches * args.prompts, held=False, seed=0)
    grads: dict[str, list[torch.Tensor]] = {"k1": [], "topk": [], "exact": []}
    t0 = time.perf_counter()
    for b in range(args.batches):
        prompts = smollm2_eval.encode_prompts(tok, questions[b * args.prompts:(b + 1) * args.prompts])
        prompts = [p for p in prompts for _ in range(args.samples)]
        answers = smollm2_eval.generate(student, prompts, smollm2.RESPONSE_TOKENS, {tok.eos_token_id},
                                        tok.pad_token_id or 0, greedy=False, seed=b, batch=len(prompts))
        # one batch, scored at the rows that predict an answer token (the evaluation's own batching and teacher rows)
        (ids, attention, scored), = smollm2_eval._chunks(prompts, answers, len(prompts))
        (lt,) = smollm2_eval.response_logprobs(teacher, prompts, answers, batch=len(prompts))
        hidden = student.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state[scored]
        z = student.get_output_embeddings()(hidden).float()
        ls, y = z.log_softmax(-1), torch.tensor([t for a in answers for t in a])
        lp = ls.gather(-1, y[:, None])[:, 0]
        adv = -(lp - lt.gather(-1, y[:, None])[:, 0]).detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        top = lt.topk(32, -1)
        losses = {"k1": -(adv * lp).mean(), "topk": ok.topk_kl(z, top.indices, top.values).mean(),
                  "exact": (ls.exp() * (ls - lt)).sum(-1).mean()}
        for name, loss in losses.items():
            g = torch.autograd.grad(loss, params, retain_graph=True)
            grads[name].append(torch.cat([x.reshape(-1) for x in g]).to(torch.bfloat16))
        print(f"batch {b + 1}/{args.batches}: {len(answers)} answers, {len(y)} answer tokens "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    ref = torch.stack([g.float() for g in grads["exact"]]).mean(0)

    def cos(a, b):
        a, b = a.float(), b.float()
        return float(a @ b / (a.norm() * b.norm()))
    # kinds first, then the bands of layers (a stable sort keeps each in model order)
    groups = {"all": [slice(0, ref.numel())],
              **dict(sorted(_groups(student).items(), key=lambda g: g[0].startswith("layers")))}
    print(f"\ncosine with the exact gradient averaged over {args.batches} batches (per batch, mean over batches); "
          "value / sign")
    print(f"{'group':<10} {'params':>8}  " + "  ".join(f"{k:>13}" for k in grads))
    for kind, slices in groups.items():
        r = torch.cat([ref[s] for s in slices])
        r_sign = torch.sign(r)
        cells = []
        for name in grads:
            parts = [torch.cat([g[s] for s in slices]) for g in grads[name]]
            value = sum(cos(p, r) for p in parts) / len(parts)
            sign = sum(cos(torch.sign(p.float()), r_sign) for p in parts) / len(parts)
            cells.append(f"{value:6.2f} / {sign:4.2f}")
        print(f"{kind:<10} {r.numel() / 1e6:7.1f}M  " + "  ".join(cells))


if __name__ == "__main__":
    main()
