"""The schema of the trajectory buffer's settings (`buffer:` in the Hydra config holds overrides only)."""

from __future__ import annotations

from dataclasses import dataclass

ORDERS = ("fifo", "newest")


@dataclass(frozen=True)
class BufferConfig:
    """Settings of `replay.ReplayBuffer`; checked at construction, so a bad value fails before any actor starts.

    Attributes:
        capacity: most groups held at once. A `put` into a full buffer waits, which is the back-pressure that keeps
            rollout actors from running ahead of the learner and memory from growing without bound.
        max_staleness: most policy versions a group may lag the learner's current version; older groups are dropped
            and counted (0 = strictly on-policy, as in the paper's sync loop; async mode needs >= 1).
        order: which groups `get` hands out first: "fifo" (oldest first, so nothing waits forever) or "newest"
            (highest policy version first, then latest put: the least off-policy data at the cost of starving old).
        drop_uniform_reward_groups: drop groups whose G total rewards are all equal at `put`. Their group-relative
            advantages are all zero, so they carry no GRPO signal and would only dilute the batch (DAPO's dynamic
            sampling).
        put_timeout_s: how long a `put` waits for room before it gives up and counts a "put_timeout" drop;
            None waits until there is room or the buffer closes.
        get_timeout_s: how long a `get` waits for a full batch before returning what it has (possibly fewer);
            None waits until the batch is full or the buffer closes.
    """

    capacity: int = 256
    max_staleness: int = 1
    order: str = "fifo"
    drop_uniform_reward_groups: bool = False
    put_timeout_s: float | None = None
    get_timeout_s: float | None = 300.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> BufferConfig:
        """Raises ValueError naming the first bad key, what it must be and what it got; returns self if all is fine."""
        forever = "a number >= 0, or null to wait without limit"
        problems = {
            "capacity": None if _is_int(self.capacity) and self.capacity >= 1 else "an integer >= 1",
            "max_staleness": None if _is_int(self.max_staleness) and self.max_staleness >= 0 else "an integer >= 0",
            "order": None if self.order in ORDERS else "one of " + ", ".join(repr(o) for o in ORDERS),
            "drop_uniform_reward_groups": None if isinstance(self.drop_uniform_reward_groups, bool) else "a boolean",
            "put_timeout_s": None if _is_timeout(self.put_timeout_s) else forever,
            "get_timeout_s": None if _is_timeout(self.get_timeout_s) else forever,
        }
        for key, problem in problems.items():
            if problem:
                raise ValueError(f"buffer config: {key!r} must be {problem}; got {getattr(self, key)!r}")
        return self


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_timeout(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)
