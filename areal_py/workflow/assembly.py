"""An Episode as the trained sequence: one pure function, the rule in its docstring."""
from __future__ import annotations

from dataclasses import dataclass

from areal_py.workflow.api import Episode, FinishReason

MAX_EPISODE_TOKENS = 1 << 20  # far above any context; a bound so a runaway workflow fails loudly


@dataclass(frozen=True)
class AssembledEpisode:
    """The response part of the trained sequence (the prompt ids precede it) with one entry per token."""

    output_ids: list[int]
    loss_mask: list[int]     # 1: a model token (trained); 0: tool output or scaffolding (context only)
    logprobs: list[float]    # the engine's behaviour logprob on model tokens, 0.0 elsewhere
    versions: list[int]      # see `assemble`
    oldest_version: int      # the oldest model token's version: what the staleness bound counts
    finish_reason: FinishReason

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)


def assemble(episode: Episode) -> AssembledEpisode:
    """The response of the trained sequence: the segments' ids concatenated in order.

    Rule per token: a model segment's token carries mask 1, its engine logprob and version; a non-model
    token carries mask 0, logprob 0.0 and the version of the nearest model token before it (the first
    model token's when none precedes it). So `versions` never decreases along the sequence when the
    model's versions do not, and ``min(versions)`` is the oldest model token's version whether or not a
    reader applies the mask: a reader unaware of the mask counts the episode's staleness correctly.

    Raises ValueError for a model segment whose logprobs or versions do not match its ids, a non-model
    segment that carries any, an episode with no model token (nothing to train), or one longer than
    MAX_EPISODE_TOKENS.
    """
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    model_versions: list[int | None] = []
    for i, seg in enumerate(episode.segments):
        if seg.from_model:
            if not (len(seg.ids) == len(seg.logprobs) == len(seg.versions)):
                raise ValueError(f"episode segment {i} (model): {len(seg.ids)} ids, {len(seg.logprobs)} logprobs, "
                                 f"{len(seg.versions)} versions; they must be equal")
            logprobs.extend(float(x) for x in seg.logprobs)
            model_versions.extend(int(v) for v in seg.versions)
        else:
            if seg.logprobs or seg.versions:
                raise ValueError(f"episode segment {i} is not the model's but carries logprobs or versions: "
                                 f"only model tokens have them (Segment.context)")
            logprobs.extend(0.0 for _ in seg.ids)
            model_versions.extend(None for _ in seg.ids)
        ids.extend(int(t) for t in seg.ids)
        mask.extend((1 if seg.from_model else 0) for _ in seg.ids)
        if len(ids) > MAX_EPISODE_TOKENS:
            raise ValueError(f"episode longer than {MAX_EPISODE_TOKENS} tokens")
    known = [v for v in model_versions if v is not None]
    if not known:
        raise ValueError("episode has no model token: nothing to train (a workflow must generate at least once)")
    versions, last = [], known[0]
    for v in model_versions:
        last = v if v is not None else last
        versions.append(last)
    return AssembledEpisode(ids, mask, logprobs, versions, min(known), episode.finish_reason)
