r"""The OPD plan: how on-policy distillation runs, decided once (in :func:`~.validation.validate`) from the flags.

The driver loop, the rollout manager's teacher hook and the trainer read :class:`OPDPlan`; nothing re-decides a mode.

========  ==========  ==============================================  ==============================================
teacher   kl          what the teacher provides per response token    where the KL acts
========  ==========  ==============================================  ==============================================
sglang    k1, k2, k3  log p_T(sampled token) (the scoring request)    advantage: A' = A - coef * k(lp_S - lp_T)
sglang    topk        the teacher's top-K (id, log p_T) pairs         loss: coef * KL over the K ids + a tail bucket
sglang    full        all V log-probs (top_logprobs_num = V <= 4096)  loss: coef * the exact KL (top-k kernel, K=V)
megatron  k1, k2, k3  teacher logits in the trainer -> log p_T(tok)    advantage, as above
megatron  full        teacher logits in the trainer                   loss: coef * the exact KL
========  ==========  ==============================================  ==============================================

Why the exact and top-k KLs are loss terms and not advantage penalties: ``KL_t = sum_v p_S(v) (log p_S(v) -
log p_T(v))`` depends on the prefix only, not on the sampled token, so as a detached advantage of that token its
policy-gradient contribution is zero in expectation (pure variance). As a loss, its gradient is the sampled-k1
gradient with the expectation over the token taken analytically.

Temperature (SPEC §1): SGLang scores prompts at T = 1 whatever the request says. At a rollout temperature T != 1 an
SGLang teacher's numbers are usable only when its full distribution is fetched and rescaled exactly to T
(``log_softmax(log p_1 / T)``): the plan then asks for K = V (sampled and full modes, V <= 4096); a truncated top-k
cannot be rescaled, and a vocabulary too large to fetch is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..types import KL_ESTIMATORS

# Above this vocabulary size the teacher's full distribution over HTTP (top_logprobs_num = V per response token)
# is refused: at V = 151936 one 1k-token response would be ~150M JSON numbers. --opd-kl-mode topk carries K of them.
MAX_FULL_KL_HTTP_VOCAB = 4096


@dataclass(frozen=True)
class OPDPlan:
    teacher: str            # "sglang" (HTTP server, scored during rollout) | "megatron" (frozen model in the trainer)
    kl: str                 # "k1" | "k2" | "k3" (sampled-token estimators) | "topk" | "full"
    coef: float             # --opd-kl-coef
    teacher_topk: int = 0   # SGLang teacher: log-prob entries per response position to request (0, K or V)
    temperature: float = 1.0

    @property
    def sampled(self) -> bool:
        """The KL term is a sampled-token estimator, applied to the advantage (slime's objective)."""
        return self.kl in KL_ESTIMATORS

    @property
    def advantage_coef(self) -> float:
        """Coefficient of the KL term in the advantage (0 when the KL is a loss term)."""
        return self.coef if self.sampled else 0.0

    @property
    def loss_coef(self) -> float:
        """Coefficient of the KL term in the trainer's loss (0 for the sampled estimators)."""
        return 0.0 if self.sampled else self.coef

    @property
    def rescales_teacher(self) -> bool:
        """The SGLang teacher's full distribution is rescaled from T = 1 to the rollout temperature."""
        return self.teacher == "sglang" and self.temperature != 1.0

    def describe(self) -> str:
        where = "advantage penalty" if self.sampled else "loss term"
        source = {"sglang": "SGLang teacher over HTTP", "megatron": "Megatron teacher in the trainer"}[self.teacher]
        extra = f", teacher top-{self.teacher_topk}" if self.kl == "topk" else ""
        return f"{source}, {self.kl} KL as {where} (coef {self.coef:g}{extra})"
