"""SGLang mode checks its teacher before anything starts: reachable, and the same vocabulary as the student."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from e2e_helpers import driver_values


def _fake_teacher(model_info: dict, server_info: dict):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            body = {"/health": {}, "/get_model_info": model_info, "/get_server_info": server_info}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(json.dumps(body or {}).encode())

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _config(toy, tmp_path, url):
    from opd_train.config import build_config, validate
    return validate(build_config(driver_values(toy, tmp_path / "out", use_opd=True, opd_type="sglang",
                                               rm_url=url + "/generate", opd_teacher_timeout=2.0)))


def test_unreachable_teacher_fails_before_anything_starts(toy, tmp_path, monkeypatch):
    import opd_train.train as train
    from opd_train.rollout.engines import free_port
    from opd_train.types import TeacherUnavailable
    monkeypatch.setattr(train.Runtime, "start", lambda *a, **k: pytest.fail("the runtime was started"))
    url = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(TeacherUnavailable, match=f"the teacher at {url} is not reachable"):
        train.run(_config(toy, tmp_path, url))
    assert time.perf_counter() - start < 30


def _preflight(cfg):
    from opd_train.teacher import preflight
    return preflight(cfg.reward.rm_url, student_dir=cfg.model.hf_checkpoint, student_vocab=cfg.derived["vocab_size"],
                     timeout=cfg.opd.opd_teacher_timeout)


@pytest.mark.parametrize("how", ["model_dir", "server_info"])
def test_teacher_with_another_vocabulary_is_refused(toy, tmp_path, how):
    from opd_train.teacher import TeacherMismatch
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 32}))
    info = {"model_path": str(other)} if how == "model_dir" else {"model_path": "/not/here"}
    server = _fake_teacher(info, {"vocab_size": 32})
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        message = ("the teacher's vocab_size \\(32, .*\\) differs from the student's \\(16, " if how == "model_dir"
                   else f"the teacher at {url} has vocab_size 32 but the student has 16")
        with pytest.raises(TeacherMismatch, match=message):
            _preflight(_config(toy, tmp_path, url))
        same = _fake_teacher({"model_path": toy["teacher"]}, {})
        try:
            facts = _preflight(_config(toy, tmp_path, f"http://127.0.0.1:{same.server_address[1]}"))
            assert facts == {"vocab_size": 16}
        finally:
            same.shutdown()
    finally:
        server.shutdown()


def test_the_cli_reports_a_mismatched_teacher_as_a_flag_error(toy, tmp_path, monkeypatch):
    """run() turns the preflight's mismatch into a ConfigError (exit status 2), before the runtime starts."""
    import opd_train.train as train
    from opd_train.config import ConfigError
    monkeypatch.setattr(train.Runtime, "start", lambda *a, **k: pytest.fail("the runtime was started"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 32}))
    server = _fake_teacher({"model_path": str(other)}, {})
    try:
        with pytest.raises(ConfigError, match="differs from the student's"):
            train.run(_config(toy, tmp_path, f"http://127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
