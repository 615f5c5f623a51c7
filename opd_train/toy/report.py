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
    """``runs``: name -> (table label, flag values). Prints the table; writes results.json and curves.png."""
    curves = {name: eval_curve(os.path.join(values["output_dir"], "metrics.jsonl"))
              for name, (_, values) in runs.items()}
    first = next(iter(curves.values()))
    student_acc = first[0][1] if first and first[0][0] == 0 else float("nan")
    any_run = next(iter(runs.values()))[1]
    steps, samples = any_run["num_rollout"], any_run["rollout_batch_size"] * any_run["n_samples_per_prompt"]
    grpo = results.get("grpo", {}).get("eval/pass@1")
    rows = [("student SFT", student_acc, f"{student_meta['params']:,} params")]
    per_run = {}
    for name, (label, values) in runs.items():
        final = results[name].get("eval/pass@1", float("nan"))
        lowest = min((acc for _, acc in curves[name]), default=float("nan"))
        per_run[name] = {"label": label, "final": final, "lowest_eval": lowest,
                         "max_drop_below_start": student_acc - lowest, "lr": values.get("lr")}
        if values.get("use_opd"):
            per_run[name].update(gap_closed=gap_closed(final, student_acc, teacher_acc),
                                 beats_grpo=None if grpo is None else final > grpo)
            closed = per_run[name]["gap_closed"]
            note = (f"{steps} steps x {samples} samples, {values['opd_type']} teacher, lr {values['lr']:g}"
                    + ("" if closed is None else f", closes {closed:.0%} of the gap"))
        else:
            note = f"same steps and samples, lr {values['lr']:g}"
        rows.append((label, final, note))
    rows.append(("teacher", teacher_acc, f"{teacher_meta['params']:,} params"))
    table = _table(rows)
    summary = {
        "table": {name: acc for name, acc, _ in rows}, "table_markdown": table, "per_run": per_run,
        "eval_curves": curves, "num_rollout": steps, "samples_per_step": samples, "seconds": round(seconds, 1),
        "runs": {name: {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None)))}
                 for name, (_, values) in runs.items()},
        "sft": {"teacher": teacher_meta, "student": student_meta},
    }
    save_summary(out, summary, runs)
    print(f"\n{table}\n")
    for r in per_run.values():
        drop = r["max_drop_below_start"] * 100
        where = f"{drop:.1f} points below the start" if drop > 0.05 else "never below the start"
        print(f"{r['label']}: lowest evaluation {r['lowest_eval']:.1%} ({where})")
    print(f"total {seconds:.0f} s; results: {os.path.join(out, 'results.json')}", flush=True)
    return summary


def save_summary(out: str, summary: dict, runs: dict[str, tuple[str, dict]]) -> None:
    """``OUTPUT_DIR/results.json`` (written atomically) and ``curves.png`` with every run's metrics."""
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    plot_curves("", os.path.join(out, "curves.png"),
                runs={label: os.path.join(v["output_dir"], "metrics.jsonl") for label, v in runs.values()})
