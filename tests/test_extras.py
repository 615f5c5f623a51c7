"""Without an extra installed, every entry point prints one line naming what to install (no traceback), before
any expensive work: simulated by making the module unimportable (``sys.modules[name] = None``) in a fresh process."""
from __future__ import annotations

import subprocess
import sys

import pytest

RUN = ("import sys; sys.modules[{module!r}] = None; from opd_train.cli import main; "
       "sys.exit(main({argv!r}))")


@pytest.mark.parametrize("module, argv, expect", [
    ("aiohttp", ["--output-dir", "{tmp}", "--num-rollout", "1"], '"opd[train]"'),
    ("orjson", ["serve", "--model", "{tmp}"], '"opd[train]"'),
    ("megatron.core", ["--output-dir", "{tmp}"], "megatron-core==0.19.2"),
    ("megatron.core", ["convert", "hf2dist", "{tmp}/a", "{tmp}/b"], "megatron-core==0.19.2"),
    ("safetensors", ["convert", "--hf-checkpoint", "{tmp}/a", "--save", "{tmp}/b"], '"opd[train]"'),
])
def test_a_missing_extra_is_one_line(module, argv, expect, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-c", RUN.format(module=module, argv=argv)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"no module named '{module}'" in lines[0] and expect in lines[0], lines[0]
    assert not any(tmp_path.iterdir()), "work started before the missing module was reported"


def test_an_unrelated_missing_module_is_not_hidden():
    from opd_train.extras import missing_module_message
    assert missing_module_message(ModuleNotFoundError("x", name="not_ours")) is None
