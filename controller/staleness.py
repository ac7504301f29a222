"""Staleness control: how much work the controller may have in flight, and how old a sample is.

AReaL bounds off-policyness at *submission* time rather than by throwing finished work away:
a prompt group is admitted only while

    accepted + running < (version + max_staleness + 1) * batch_size

where ``version`` is the current global policy version (number of updates so far),
``accepted`` counts the groups finished and kept over the whole run (including those already
trained on), and ``running`` counts the groups in flight. Every count is in groups: one prompt's
n samples are one unit, as ``batch_size`` is. Since the trainer consumes ``batch_size`` groups
per version, generation never runs more than ``max_staleness`` batches ahead of training;
``max_staleness = 0`` is on-policy (exactly ``batch_size`` groups per version). Groups that are
dropped (filtered, failed) leave ``accepted + running`` and so free their slot.

Admission alone does not bound the age of every trained sample: groups finish out of order, and
a long response admitted at version v may still be generating many versions later while short
ones fill the batches. The controller therefore also drops, at batching, any group whose
``sample_staleness(batch_version, token_versions)`` exceeds ``max_token_staleness``, which is
``max_staleness`` unless raised. Long chain-of-thought wants it raised: AReaL bounds staleness
only at admission and lets the decoupled objective's behaviour weight correct the older tokens.

AReaL's rule also bounds concurrency (areal/infra/staleness_manager.py, ``get_capacity``): with
``max_concurrent`` set, at most that many groups are in flight at once, whatever the staleness
bound allows, so the capacity is ``min(max_concurrent - running, staleness capacity)``.
``max_concurrent = None`` (the default) leaves only the staleness term. Concurrency is counted in
groups, as ``running`` is.

A trajectory interrupted by a weight update carries tokens from several versions; its staleness
is that of its oldest token, since that is the token furthest from the policy being trained.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

__all__ = ["admission_capacity", "can_admit", "sample_staleness", "within_bound"]


def _count(name: str, value: int, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def admission_capacity(version: int, max_staleness: int, batch_size: int, accepted: int, running: int,
                       max_concurrent: int | None = None) -> int:
    """Groups the controller may still admit, never negative:

        staleness   = (version + max_staleness + 1) * batch_size - (accepted + running)
        concurrency = max_concurrent - running                    (unbounded when max_concurrent is None)
        capacity    = max(0, min(staleness, concurrency))

    If the version went backwards or counts overshoot (e.g. a re-dispatch raced a completion, or
    ``max_concurrent`` was lowered on resume below what is in flight) the answer is simply 0,
    "admit nothing".
    """
    version = _count("version", version, 0)
    max_staleness = _count("max_staleness", max_staleness, 0)
    batch_size = _count("batch_size", batch_size, 1)
    accepted = _count("accepted", accepted, 0)
    running = _count("running", running, 0)
    capacity = (version + max_staleness + 1) * batch_size - (accepted + running)
    if max_concurrent is not None:
        capacity = min(capacity, _count("max_concurrent", max_concurrent, 1) - running)
    return max(0, capacity)


def can_admit(version: int, max_staleness: int, batch_size: int, accepted: int, running: int,
              max_concurrent: int | None = None) -> bool:
    """True while ``accepted + running < (version + max_staleness + 1) * batch_size`` and, if
    ``max_concurrent`` is set, ``running < max_concurrent``."""
    return admission_capacity(version, max_staleness, batch_size, accepted, running, max_concurrent) > 0


def sample_staleness(trainer_version: int, token_versions: Sequence[int]) -> int:
    """Age of the oldest token: ``trainer_version - min(token_versions)``; 0 for no tokens.

    A token version newer than ``trainer_version`` cannot happen (weights flow trainer ->
    controller -> servers), so it is reported as a ValueError rather than as negative staleness.
    """
    trainer_version = _count("trainer_version", trainer_version, 0)
    if len(token_versions) == 0:
        return 0
    oldest = _count("min(token_versions)", min(token_versions), 0)
    newest = _count("max(token_versions)", max(token_versions), 0)
    if newest > trainer_version:
        raise ValueError(
            f"token_versions contains version {newest}, newer than trainer_version {trainer_version}")
    return trainer_version - oldest


def within_bound(trainer_version: int, token_versions: Sequence[int], max_staleness: int) -> bool:
    """True when ``sample_staleness(trainer_version, token_versions) <= max_staleness``."""
    max_staleness = _count("max_staleness", max_staleness, 0)
    return sample_staleness(trainer_version, token_versions) <= max_staleness
