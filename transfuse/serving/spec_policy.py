"""SpeculationPolicy: per request, whether speculating pays and how many tokens to propose.

Glossary: a acceptance rate (the chance that the target accepts a draft token, given it
accepted the ones before), k draft tokens per step, t_plain the time of a step without this
request's drafts, t_spec the time of the step with them (proposing included), c the relative
cost of one more draft token: t_spec = t_plain * (1 + c * k).

Model (the i.i.d. acceptance model of Leviathan et al. 2023): a step with k drafts emits
E(k) = (1 - a^(k+1)) / (1 - a) tokens on average (k + 1 when a = 1), at a cost of
1 + c * k plain steps. Speculating pays when E(k) / (1 + c * k) > ``min_speedup``.

Measured per request from what the engine reports after each speculative step
(:meth:`record`: tokens proposed and accepted, the step's time and the engine's estimate of
the same step without speculation):

- a: accepted drafts / drafts the target judged. A step that accepted j of n drafts judged
  j + 1 of them when j < n (the first rejection ends the step), n when j = n. Both counts
  decay by ``decay`` per step, so a request whose text changes character is followed; they
  start from a prior (``prior_acceptance`` with the weight of ``prior_weight`` judged
  drafts).
- c: from t_spec / t_plain at the k that was used, averaged the same way.

Once ``min_steps`` speculative steps are measured, k becomes the k in [1, ``max_k``] with the
best E(k) / (1 + c * k) (``adapt_k``), and speculation turns off for the request when even
that is below ``min_speedup``. Off is not forever: it is **re-probed rarely** — after
``reprobe_after`` decode steps of the request (counted by :meth:`enabled`, which the engine
asks once per decode step) it is tried again from the prior, and each time it turns off again
the wait doubles. ``reprobe_after=None`` never re-probes. Steps with nothing proposed (prompt
lookup found no match) tell nothing about a and are not recorded.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from transfuse.errors import InputError


@dataclass
class _State:
    """One request's measurements (private bookkeeping of the policy)."""

    k: int
    accepted: float  # decayed count of accepted drafts
    judged: float  # decayed count of drafts the target judged
    cost: float | None = None  # c, decayed mean; None until a time was reported
    steps: int = 0  # speculative steps measured since the last (re)start
    on: bool = True
    wait: int = 0  # decode steps left until the next probe (while off)
    backoff: int = 0  # the current re-probe wait
    proposed_total: int = 0
    accepted_total: int = 0
    disabled_times: int = 0


class SpeculationPolicy:
    """On/off and k per request from measured acceptance and step times (module docstring)."""

    def __init__(self, k: int = 4, *, max_k: int | None = None, adapt_k: bool = True,
                 min_steps: int = 4, min_speedup: float = 1.0, prior_acceptance: float = 0.6,
                 prior_weight: float = 4.0, decay: float = 0.9,
                 reprobe_after: int | None = 256) -> None:
        _int("k", k, 1)
        max_k = k if max_k is None else max_k
        _int("max_k", max_k, k)
        _int("min_steps", min_steps, 1)
        if reprobe_after is not None:
            _int("reprobe_after", reprobe_after, 1)
        for name, value, ok in (("min_speedup", min_speedup, min_speedup > 0),
                                ("prior_acceptance", prior_acceptance,
                                 0 <= prior_acceptance <= 1),
                                ("prior_weight", prior_weight, prior_weight > 0),
                                ("decay", decay, 0 < decay <= 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise InputError(f"SpeculationPolicy: {name} out of range: {value!r}")
        self.k0, self.max_k, self.adapt_k = k, max_k, adapt_k
        self.min_steps, self.min_speedup = min_steps, float(min_speedup)
        self.prior_acceptance, self.prior_weight = float(prior_acceptance), float(prior_weight)
        self.decay, self.reprobe_after = float(decay), reprobe_after
        self._state: dict[Hashable, _State] = {}

    # -- what the engine asks ------------------------------------------------------------------

    def enabled(self, request_id: Hashable) -> bool:
        """Whether to speculate for the request in this decode step (ask once per step: while
        off, each call counts one plain step towards the next probe)."""
        s = self._get(request_id)
        if s.on:
            return True
        if s.wait > 0:
            s.wait -= 1
        if s.wait == 0 and self.reprobe_after is not None:
            self._restart(s)  # the probe: measured afresh from the prior
            return True
        return False

    def k(self, request_id: Hashable) -> int:
        """How many tokens to propose for the request now."""
        return self._get(request_id).k

    def record(self, request_id: Hashable, proposed: int, accepted: int, spec_step_s: float,
               plain_step_s_estimate: float | None) -> None:
        """A speculative step of the request ran: ``proposed`` drafts, ``accepted`` of them,
        the step took ``spec_step_s``; the engine estimates the same step without speculation
        at ``plain_step_s_estimate`` (None: unknown, only acceptance is updated)."""
        _int("proposed", proposed, 0)
        _int("accepted", accepted, 0)
        if accepted > proposed:
            raise InputError(f"SpeculationPolicy.record: request {request_id!r} accepted "
                             f"{accepted} of {proposed} proposed tokens")
        s = self._get(request_id)
        if proposed == 0:
            return
        s.proposed_total += proposed
        s.accepted_total += accepted
        judged = accepted + (1 if accepted < proposed else 0)
        s.accepted = self.decay * s.accepted + accepted
        s.judged = self.decay * s.judged + judged
        if _positive_time(spec_step_s) and _positive_time(plain_step_s_estimate):
            cost = max(0.0, spec_step_s / plain_step_s_estimate - 1.0) / proposed
            s.cost = cost if s.cost is None else self.decay * s.cost + (1 - self.decay) * cost
        s.steps += 1
        if s.steps < self.min_steps or s.cost is None:
            return
        best_k, best = self.best_k(self.acceptance(request_id), s.cost)
        if self.adapt_k:
            s.k = best_k
        if best < self.min_speedup:
            s.on = False
            s.disabled_times += 1
            if self.reprobe_after is not None:
                s.backoff = self.reprobe_after if s.backoff == 0 else 2 * s.backoff
                s.wait = s.backoff

    def release(self, request_id: Hashable) -> None:
        """The request is gone."""
        self._state.pop(request_id, None)

    # -- what it knows ---------------------------------------------------------------------------

    def acceptance(self, request_id: Hashable) -> float:
        """The decayed acceptance estimate a (prior included)."""
        s = self._get(request_id)
        return s.accepted / s.judged

    def stats(self, request_id: Hashable) -> dict[str, object]:
        """``enabled``, ``k``, ``acceptance`` (estimate), ``proposed`` / ``accepted`` (totals),
        ``cost_per_draft`` (c), ``expected_speedup`` at the current k, ``disabled_times``."""
        s = self._get(request_id)
        a = s.accepted / s.judged
        return {"enabled": s.on, "k": s.k, "acceptance": a, "proposed": s.proposed_total,
                "accepted": s.accepted_total, "cost_per_draft": s.cost,
                "expected_speedup": None if s.cost is None else speedup(a, s.k, s.cost),
                "disabled_times": s.disabled_times}

    def best_k(self, acceptance: float, cost: float) -> tuple[int, float]:
        """The k in [1, max_k] with the best expected speedup, and that speedup."""
        return max(((k, speedup(acceptance, k, cost)) for k in range(1, self.max_k + 1)),
                   key=lambda kv: kv[1])

    # -- internals -----------------------------------------------------------------------------

    def _get(self, request_id: Hashable) -> _State:
        s = self._state.get(request_id)
        if s is None:
            s = self._state[request_id] = _State(self.k0, 0.0, 0.0)
            self._restart(s)
        return s

    def _restart(self, s: _State) -> None:
        s.on, s.steps, s.wait = True, 0, 0
        s.accepted = self.prior_acceptance * self.prior_weight
        s.judged = self.prior_weight
        s.k = self.k0


def expected_tokens(acceptance: float, k: int) -> float:
    """E(k): tokens a step with k drafts emits on average (module docstring)."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def speedup(acceptance: float, k: int, cost: float) -> float:
    """E(k) / (1 + c k): tokens per unit of plain-step time, relative to plain decoding."""
    return expected_tokens(acceptance, k) / (1.0 + cost * k)


def _positive_time(t: object) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"SpeculationPolicy: {name} must be an int >= {low}, got {value!r}")


__all__ = ["SpeculationPolicy", "expected_tokens", "speedup"]
