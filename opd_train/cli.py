"""``opd-train``: parse -> validate -> run.

    opd-train [train] [FLAGS]          on-policy distillation / RL training (the default command). Without
                                       --hf-checkpoint it runs the built-in CPU experiment (toy task, tiny models).
    opd-train serve --model DIR ...    our SGLang-protocol CPU inference server (student engine or teacher)
    opd-train convert hf2dist|dist2hf SRC DST [--step N] [--dtype fp32|bf16]
                                       HF safetensors <-> Megatron torch_dist checkpoints

Every flag error is reported before anything starts (no Ray, no server, no model).
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, add_arguments, build_config, explicit_values, validate
from .types import TeacherUnavailable

SUBCOMMANDS = ("train", "serve", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-train", usage="opd-train [train|serve|convert] [FLAGS]  (opd-train serve --help, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
        epilog="Example (SGLang teacher): opd-train --hf-checkpoint Qwen3-8B --prompt-data train.jsonl --use-opd "
               "--opd-type sglang --rm-url http://127.0.0.1:13141/generate --rollout-batch-size 16 "
               "--n-samples-per-prompt 4 --global-batch-size 64")
    add_arguments(parser)
    return parser


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-train convert",
                                description="Convert between HF safetensors and Megatron torch_dist checkpoints.")
    p.add_argument("direction", choices=("hf2dist", "dist2hf"), help="hf2dist: HF dir -> torch_dist; dist2hf: back")
    p.add_argument("src", help="source directory (HF model dir, or torch_dist checkpoint dir)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--step", type=int, default=None, help="iteration to write (hf2dist, default 0) or read "
                                                          "(dist2hf, default: the latest)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights dtype of the output")
    p.add_argument("--master-port", type=int, default=29511, help="port of the 1-process gloo/nccl group")
    return p


def convert_main(argv: list[str]) -> int:
    ns = convert_parser().parse_args(argv)
    from .backends.megatron import tools
    out = tools.run_conversion(ns.direction, ns.src, ns.dst, step=ns.step, dtype=ns.dtype,
                               master_port=ns.master_port)
    print(f"opd-train convert: wrote {out}")
    return 0


def train_main(argv: list[str]) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        values = explicit_values(ns)
        if values.get("hf_checkpoint") is None:
            from .toy.experiment import run_experiment
            run_experiment(values)
        else:
            from .train import run
            run(validate(build_config(values)))
    except ConfigError as exc:
        parser.exit(2, f"opd-train: error: {exc}\n")
    except TeacherUnavailable as exc:
        where = f"; resumable checkpoint: {exc.checkpoint} (resume with --load)" if exc.checkpoint else ""
        parser.exit(3, f"opd-train: error: {exc}{where}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    if command == "serve":
        from .serving import main as serve_main
        return serve_main(rest) or 0
    if command == "convert":
        return convert_main(rest)
    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
