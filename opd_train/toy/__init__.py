"""The built-in CPU experiment (``opd-train`` with no model): the toy task, its tiny models, the result table."""
