"""Task rewards: exact match, math answers (\\boxed{} extraction + normalisation), loading by name or path."""
from __future__ import annotations

import asyncio

import pytest

from opd_train.rollout.rewards import (call_reward, exact_match, get_reward_function, last_boxed, math_equal,
                                       math_reward, normalize_math)
from opd_train.types import Sample


def sample(response: str, label):
    return Sample(response=response, label=label)


def test_exact_match():
    assert exact_match(None, sample(" 975 ", "975")) == 1.0
    assert exact_match(None, sample("9750", "975")) == 0.0
    with pytest.raises(ValueError, match="exact_match needs a label .* --label-key"):
        exact_match(None, sample("1", None))


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),          # the last one, nested braces
    (r"\fbox{7}", "7"),
    (r"\boxed{unbalanced", None),
    ("no box", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("a, b, equal", [
    ("42", "42.0", True), (r"\frac{1}{2}", "0.5", True), (r"\dfrac12", r"\frac{1}{2}", True), ("1/2", "0.5", True),
    ("-3/6", "-0.5", True), (r"\left(3\right)", "(3)", True), ("x = 5", "5", True), ("1,000", "1000", True),
    (r"90^\circ", "90", True), (r"50\%", "50", True), (r"\text{ cm}5", "cm5", True), ("3.", "3", True),
    ("2", "3", False), (r"\frac{1}{3}", "0.33", False), ("1/0", "0", False), ("a+b", "b+a", False),
])
def test_math_equal(a, b, equal):
    assert math_equal(a, b) is equal, (normalize_math(a), normalize_math(b))


def test_math_reward_uses_the_last_box_and_boxed_labels():
    assert math_reward(None, sample(r"... \boxed{3} wait, \boxed{\frac{6}{4}}", r"\boxed{1.5}")) == 1.0
    assert math_reward(None, sample("the answer is 1.5", "1.5")) == 0.0        # no box: no credit
    with pytest.raises(ValueError, match="needs a label"):
        math_reward(None, sample(r"\boxed{1}", None))


def test_reward_lookup_and_async_call():
    assert get_reward_function("exact_match") is exact_match
    assert get_reward_function("opd_train.rollout.rewards.math_reward") is math_reward
    with pytest.raises(ValueError, match="cannot import 'no_such_mod.fn'"):
        get_reward_function("no_such_mod.fn")

    async def async_reward(args, s):
        return 0.25
    assert asyncio.run(call_reward(async_reward, None, sample("", ""))) == 0.25
    assert asyncio.run(call_reward(exact_match, None, sample("1", "1"))) == 1.0
