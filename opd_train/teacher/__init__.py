"""Teachers for on-policy distillation (SGLang mode; in Megatron mode the teacher is a model in the trainer).

- :class:`Teacher` / :class:`TeacherScores` (``base.py``): the interface; scores attach to a ``Sample`` as
  ``teacher_logprobs`` [R] (+ ``teacher_topk_ids`` / ``teacher_topk_logprobs`` [R, K]).
- :class:`SGLangTeacher` / :class:`SGLangTeacherConfig` (``sglang.py``): HTTP scoring against an SGLang server or
  our CPU engine; ``wire.py`` cuts SGLang's prompt log-probs down to the response span (the one length check).
- :func:`preflight` (``preflight.py``): the server answers and shares the student's tokenizer, before a run starts.
The slime-compatible reward hooks built on the client live in ``opd_train.rollout.on_policy_distillation``.
"""
from .base import Teacher, TeacherScores
from .preflight import TeacherMismatch, preflight
from .sglang import SGLangTeacher, SGLangTeacherConfig, generate_url, server_url

__all__ = ["SGLangTeacher", "SGLangTeacherConfig", "Teacher", "TeacherMismatch", "TeacherScores",
           "generate_url", "preflight", "server_url"]
