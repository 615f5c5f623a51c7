"""Teachers for on-policy distillation.

- :class:`Teacher` / :class:`TeacherScores` (``base.py``): the interface; scores attach to a ``Sample`` as
  ``teacher_log_probs`` [R] (+ ``teacher_topk_ids`` / ``teacher_topk_log_probs`` [R, K]) with a length check.
- :class:`SGLangTeacher` / :class:`SGLangTeacherConfig` (``sglang.py``): HTTP scoring against an SGLang server or
  our CPU engine (``--opd-type sglang``). The slime-compatible entry points built on it live in
  ``opd_train.rollout.on_policy_distillation``.
"""
from .base import Teacher, TeacherScores
from .sglang import SGLangTeacher, SGLangTeacherConfig, generate_url, server_url

__all__ = ["SGLangTeacher", "SGLangTeacherConfig", "Teacher", "TeacherScores", "generate_url", "server_url"]
