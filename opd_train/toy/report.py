"""The experiment's result table (printed, ``results.json``) and the teacher's evaluation over HTTP."""
from __future__ import annotations

import json
import os

from ..observability import plot_curves, read_metrics


def evaluate_teacher(url: str, eval_file: str, max_new_tokens: int = 6) -> float:
    """Greedy pass@1 of the model served at ``url`` on the held-out prompts (exact match)."""
    from ..rollout.engines import SamplingParams, SGLangEngine
    from .tokenizer import EOS_ID, encode
    with open(eval_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    engine = SGLangEngine(url)
    try:
        gens = engine.generate([encode(r["prompt"]) for r in rows],
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(EOS_ID,)))
    finally:
        engine.shutdown()                     # closes the client; the server is not ours to stop
    correct = sum(g[0].output_ids == encode(r["label"]) + [EOS_ID] for g, r in zip(gens, rows))
    return correct / len(rows)


def eval_curve(metrics_path: str) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/pass@1"]) for r in read_metrics(metrics_path) if "eval/pass@1" in r]


def gap_closed(value: float, student: float, teacher: float) -> float | None:
    return None if teacher <= student else (value - student) / (teacher - student)


def _table(rows: list[tuple[str, float, str]]) -> str:
    lines = ["| model | held-out pass@1 (greedy) | note |", "|---|---|---|"]
    lines += [f"| {name} | {acc:.1%} | {note} |" for name, acc, note in rows]
    return "\n".join(lines)


def write_results(out: str, *, teacher_acc: float, teacher_meta: dict, student_meta: dict, runs: dict,
                  results: dict, seconds: float) -> dict:
    curves = {name: eval_curve(os.path.join(values["output_dir"], "metrics.jsonl")) for name, values in runs.items()}
    student_acc = curves["opd"][0][1] if curves["opd"] and curves["opd"][0][0] == 0 else float("nan")
    steps = runs["opd"]["num_rollout"]
    samples = runs["opd"]["rollout_batch_size"] * runs["opd"]["n_samples_per_prompt"]
    opd_final = results["opd"].get("eval/pass@1", float("nan"))
    mode = f"{runs['opd'].get('opd_type')} teacher, {runs['opd'].get('opd_kl_mode', 'sampled')} KL"
    rows = [("student SFT", student_acc, f"{student_meta['params']:,} params"),
            ("student SFT + OPD", opd_final, f"{steps} steps x {samples} samples, {mode}")]
    if "grpo" in results:
        rows.append(("student SFT + GRPO (reward only)", results["grpo"].get("eval/pass@1", float("nan")),
                     f"same steps and samples, lr {runs['grpo']['lr']:g}"))
    rows.append(("teacher", teacher_acc, f"{teacher_meta['params']:,} params"))
    table = _table(rows)
    summary = {
        "table": {name: acc for name, acc, _ in rows}, "table_markdown": table,
        "opd_gap_closed": gap_closed(opd_final, student_acc, teacher_acc),
        "opd_beats_grpo": None if "grpo" not in results else opd_final > results["grpo"].get("eval/pass@1", 0.0),
        "eval_curves": curves, "num_rollout": steps, "samples_per_step": samples, "seconds": round(seconds, 1),
        "runs": {name: {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None)))}
                 for name, values in runs.items()},
        "sft": {"teacher": teacher_meta, "student": student_meta},
    }
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    plot_curves("", os.path.join(out, "curves.png"),
                runs={name: os.path.join(v["output_dir"], "metrics.jsonl") for name, v in runs.items()})
    closed = summary["opd_gap_closed"]
    print(f"\n{table}\n\nOPD closed {closed:.0%} of the student -> teacher gap" if closed is not None else table)
    print(f"total {seconds:.0f} s; results: {os.path.join(out, 'results.json')}", flush=True)
    return summary
