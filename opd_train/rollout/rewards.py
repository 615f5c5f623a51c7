r"""Task reward functions, chosen by name (``--rm-type``) or by dotted path (``--custom-rm-path``).

Every reward function has slime's signature ``fn(args, sample) -> float`` (sync or async); ``sample.response``
is the decoded response text and ``sample.label`` the ground truth.

- ``exact_match``: 1.0 when the response, stripped of surrounding whitespace, equals the label, else 0.0.
- ``math``: the answer inside the LAST ``\boxed{...}`` of the response (balanced braces; ``\fbox`` too), or the
  whole response when there is none, normalised (spaces, ``\left``/``\right``, ``\!``, ``dfrac``/``tfrac``,
  ``\text{..}``, degrees, percent, dollars, trailing dots, thousands separators) and compared with the normalised
  label; numbers (integers, decimals, ``a/b`` and ``\frac{a}{b}``) compare by value.
"""
from __future__ import annotations

import importlib
import inspect
import re
from fractions import Fraction
from typing import Any, Callable

from ..types import Sample


def exact_match(args: Any, sample: Sample) -> float:
    if sample.label is None:
        raise ValueError(f"exact_match needs a label (sample {sample.index} has none): set --label-key")
    return float(sample.response.strip() == str(sample.label).strip())


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i]
    return None


_REMOVE = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", "$", r"\$", r"^\circ", r"^{\circ}", r"\%", "%",
           r"\displaystyle")


def normalize_math(text: str) -> str:
    s = str(text).strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"^([a-zA-Z]\w*)=", "", s)          # "x=5" -> "5"
    return s


def _as_number(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?\d+(\.\d+)?|-?\.\d+", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(prediction: str, label: str) -> bool:
    a, b = normalize_math(prediction), normalize_math(label)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


def math_reward(args: Any, sample: Sample) -> float:
    if sample.label is None:
        raise ValueError(f"the math reward needs a label (sample {sample.index} has none): set --label-key")
    label = last_boxed(str(sample.label)) or str(sample.label)
    answer = last_boxed(sample.response)
    return float(answer is not None and math_equal(answer, label))


BUILTIN = {"exact_match": exact_match, "math": math_reward}


def load_function(path: str) -> Callable:
    """Import ``module.function`` (clear error naming the path)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not a dotted path module.function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {path!r}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


def get_reward_function(name_or_path: str) -> Callable:
    """A built-in reward by name, else a dotted path."""
    return BUILTIN.get(name_or_path) or load_function(name_or_path)


def dotted_name(fn: Callable) -> str:
    """``module.function`` of a built-in (so it can be passed by path, e.g. to the OPD hooks)."""
    return f"{fn.__module__}.{fn.__name__}"


async def call_reward(fn: Callable, args: Any, sample: Sample) -> Any:
    out = fn(args, sample)
    return await out if inspect.isawaitable(out) else out
