"""Fixtures for the CPU engine tests (helpers live in serving_helpers.py)."""
from __future__ import annotations

import pytest
import torch
from serving_helpers import MODEL_V1, MODEL_V2


@pytest.fixture(scope="session")
def hf_v1():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL_V1, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_v2():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL_V2, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def engine():
    """An in-process CPU engine server on the v1 fixture model (never update its weights)."""
    from opd_train.serving import ServerConfig, start_in_thread
    handle = start_in_thread(ServerConfig(model_path=MODEL_V1, port=0, num_threads=1))
    yield handle
    handle.stop()
