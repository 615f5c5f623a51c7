"""``opd-train``: parse -> validate -> run.

    opd-train [train] [FLAGS]          on-policy distillation / RL training (the default command). Without
                                       --hf-checkpoint it runs a built-in CPU experiment: the toy task with tiny
                                       models, or --experiment smollm2 (prune and heal SmolLM2-135M-Instruct).
    opd-train serve --model DIR ...    our SGLang-protocol CPU inference server (student engine or teacher)
    opd-train convert hf2dist|dist2hf SRC DST [--step N] [--dtype fp32|bf16]
                                       HF safetensors <-> Megatron torch_dist checkpoints

Every flag error is reported before anything starts (no Ray, no server, no model).
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, add_arguments, build_config, explicit_values, notices, slime, validate
from .extras import CONVERTING, SERVING, SMOLLM2, TRAINING, missing_module_message, require
from .lifecycle import RunInterrupted, interruptible
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
    slime.add_arguments(parser)
    return parser


def convert_parser(slime_form: bool) -> argparse.ArgumentParser:
    """``opd-train convert hf2dist|dist2hf SRC DST``, or slime's ``convert_hf_to_torch_dist.py`` form:
    ``[MODEL_ARGS] --hf-checkpoint SRC --save DST`` / ``--load SRC --hf-save DST`` (MODEL_ARGS are checked against
    the HF config; the architecture itself is read from it)."""
    p = argparse.ArgumentParser(prog="opd-train convert",
                                description="Convert between HF safetensors and Megatron torch_dist checkpoints.")
    if slime_form:
        p.add_argument("--hf-checkpoint", help="HF model dir to convert to torch_dist (needs --save)")
        p.add_argument("--save", help="torch_dist checkpoint dir to write")
        p.add_argument("--load", help="torch_dist checkpoint dir to convert to HF (needs --hf-save)")
        p.add_argument("--hf-save", help="HF model dir to write")
        p.add_argument("--ckpt-step", dest="step", type=int, default=None, help="iteration written / read")
        slime.add_arguments(p)
    else:
        p.add_argument("direction", choices=("hf2dist", "dist2hf"), help="hf2dist: HF dir -> torch_dist; dist2hf: "
                                                                         "back")
        p.add_argument("src", help="source directory (HF model dir, or torch_dist checkpoint dir)")
        p.add_argument("dst", help="destination directory")
        p.add_argument("--step", type=int, default=None, help="iteration to write (hf2dist, default 0) or read "
                                                              "(dist2hf, default: the latest)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights dtype of the output")
    p.add_argument("--master-port", type=int, default=29511, help="port of the 1-process gloo/nccl group")
    return p


def convert_main(argv: list[str]) -> int:
    """Both forms of the converter; ``tools/convert_hf_to_torch_dist.py`` is this function."""
    slime_form = not argv or argv[0] not in ("hf2dist", "dist2hf", "-h", "--help")
    parser = convert_parser(slime_form)
    ns = parser.parse_args(argv)
    require(CONVERTING)
    try:
        if slime_form:
            model = slime.take(ns)
            if bool(ns.hf_checkpoint) == bool(ns.load) or (ns.hf_checkpoint and not ns.save) or \
                    (ns.load and not ns.hf_save):
                parser.error("give --hf-checkpoint DIR --save DIR (HF -> torch_dist) or --load DIR --hf-save DIR")
            slime.check_model_args(model.model, ns.hf_checkpoint)
            for line in model.notices:
                print(f"opd-train convert: note: {line}", file=sys.stderr)
            ns.direction, ns.src, ns.dst = (("hf2dist", ns.hf_checkpoint, ns.save) if ns.hf_checkpoint
                                            else ("dist2hf", ns.load, ns.hf_save))
        from .backends.megatron import tools
        out = tools.run_conversion(ns.direction, ns.src, ns.dst, step=ns.step, dtype=ns.dtype,
                                   master_port=ns.master_port)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"opd-train convert: error: {exc}\n")
    print(f"opd-train convert: wrote {out}")
    return 0


def training_values(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flag values given (YAML + command line), slime's flags checked, mapped or noted (one line each)."""
    ns = parser.parse_args(argv)
    extra = slime.take(ns)
    values = {**explicit_values(ns), **extra.values}
    slime.check_model_args(extra.model, values.get("hf_checkpoint"))
    for line in extra.notices:
        print(f"opd-train: note: {line}", file=sys.stderr)
    return values


def train_main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        values = training_values(parser, argv)
        require(TRAINING)
        if values.get("hf_checkpoint") is None and values.get("experiment") == "smollm2":
            require(SMOLLM2)
            from .toy.smollm2 import run_smollm2
            run_smollm2(values)
        elif values.get("hf_checkpoint") is None:
            from .toy.experiment import run_experiment
            run_experiment(values)
        else:
            from .train import run
            config = validate(build_config(values))
            for line in notices(config):
                print(f"opd-train: note: {line}", file=sys.stderr)
            run(config)
    except ConfigError as exc:
        parser.exit(2, f"opd-train: error: {exc}\n")
    except TeacherUnavailable as exc:
        where = f"; resumable checkpoint: {exc.checkpoint} (resume with --load)" if exc.checkpoint else ""
        parser.exit(3, f"opd-train: error: {exc}{where}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(argv)
    except ModuleNotFoundError as exc:          # an extra is not installed: say which, not a traceback
        message = missing_module_message(exc)
        if message is None:
            raise
        print(f"opd-train: error: {message}", file=sys.stderr)
        return 1


def dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    if command == "serve":
        require(SERVING)
        from .serving import main as serve_main
        return serve_main(rest) or 0
    if command == "convert":
        return convert_main(rest)
    with interruptible():
        try:
            return train_main(rest)
        except RunInterrupted as exc:           # everything the run started has been stopped on the way out
            print(f"opd-train: {exc}", file=sys.stderr)
            return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
