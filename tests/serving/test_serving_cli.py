"""The serve entry point: flags, early clear errors, a real subprocess that serves and stops on SIGTERM."""
from __future__ import annotations

import subprocess
import sys

from serving_helpers import MODEL_V1

from opd_train.serving import build_parser, config_from_args, main


def test_help_lists_flags():
    out = subprocess.run([sys.executable, "-m", "opd_train.serving", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--port", "--host", "--dtype", "--num-threads", "--port-file"):
        assert flag in out.stdout


def test_bad_model_dir_fails_before_loading(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_flags_parse_to_config():
    cfg = config_from_args(build_parser().parse_args(["--model-path", MODEL_V1, "--port", "0", "--dtype",
                                                      "bfloat16", "--skip-tokenizer-init"]))
    assert cfg.model_path == MODEL_V1 and cfg.port == 0 and cfg.dtype == "bfloat16" and cfg.host == "127.0.0.1"
