"""The shared trajectory buffer between the rollout actors and the learner: bounded, staleness-aware, lossless.

Images travel once. A producer puts its `TrajectoryGroup` into Ray's object store itself and hands the buffer only a
`BufferItem`: the `ObjectRef` plus the few fields the buffer decides on. Ray does not resolve refs nested inside an
argument, so the buffer process never deserializes (or holds) a board image; the learner `ray.get`s the refs of the
batch it was given and reads the groups straight from the object store (numpy arrays come back zero-copy).

`ReplayBuffer` is a plain class whose waiting methods are `async`: pytest drives it with asyncio, and
`ray.remote(ReplayBuffer)` (applied in launch/train.py) makes it an async actor, where a `put` blocked on a full
buffer yields the event loop, so the learner's `get` that frees room runs meanwhile.

Every group offered is accounted for, at all times:
`put_count == get_count + sum(drops.values()) + size + blocked_puts` (the right side is `BufferStats.accounted`).

A buffer actor that dies is restarted by Ray (launch/cluster.py: max_restarts, and max_task_retries so that the puts
and gets in flight go to the new one): the new process starts empty, with counters of its own and a new
`incarnation`, by which the driver tells it from the old one (it counts the groups the old one held as lost).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray

from replay.config import BufferConfig
from replay.trajectory import TrajectoryGroup

# Why an offered group did not come out of `get`: too old for the learner, no GRPO signal, no room in time,
# offered after `close`, or held when a checkpoint was taken (a restored buffer starts empty).
DROP_REASONS = ("stale", "uniform_reward", "put_timeout", "closed", "actor_died")
REWARD_PARTS = ("total", "game", "format", "perception")  # the parts of envs.Reward that BufferItem averages


@dataclass(frozen=True)
class BufferItem:
    """What the buffer stores for one trajectory group: a reference to it and the fields the buffer decides on."""

    ref: ray.ObjectRef  # -> TrajectoryGroup in Ray's object store
    game: str
    state_id: str
    policy_version: int  # version of the weights that generated the group
    uniform_reward: bool  # all G total rewards equal: zero group-relative advantage
    group_size: int  # G
    actor_id: str  # the producer, for debugging and per-actor stats
    # Mean of each reward part over the group's G responses (envs.Reward fields): the trained batch's reward/* tags.
    reward_mean: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_group(cls, group: TrajectoryGroup, actor_id: str) -> BufferItem:
        """Puts `group` into the object store (its one serialization) and describes it.

        The caller owns the object: Ray frees it when the caller dies, so a producer that crashes takes its groups
        still in the buffer with it (the learner's `ray.get` then raises `OwnerDiedError`). Ray 2.56 removed
        `ray.put(_owner=...)`, which could have handed ownership to the buffer.

        Args:
            group: the trajectory group to publish.
            actor_id: the producer's name.
        """
        ref = ray.put(group)
        totals = group.total_rewards()  # (G,)
        return cls(
            ref=ref,
            game=group.game,
            state_id=group.state_id,
            policy_version=group.policy_version,
            uniform_reward=len(set(totals.tolist())) <= 1,
            group_size=group.group_size,
            actor_id=actor_id,
            reward_mean={part: float(np.mean([getattr(r, part) for r in group.rewards])) for part in REWARD_PARTS},
        )


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of the buffer, for logging (`buffer/size`, `buffer/staleness`) and for the accounting invariant."""

    size: int
    capacity: int
    policy_version: int  # the learner's version as last set
    put_count: int  # groups offered, accepted or not
    get_count: int  # groups handed out
    drops: dict[str, int]  # reason (DROP_REASONS) -> groups dropped
    blocked_puts: int  # puts waiting for room right now (back-pressure in action)
    last_batch_staleness_mean: float  # policy_version minus each group's version, over the last batch handed out
    last_batch_staleness_max: int
    last_batch_staleness: tuple[int, ...] = ()  # each group's, for the buffer/staleness histogram
    offered_by_actor: dict[str, int] = field(default_factory=dict)  # producer -> groups it offered (put_count's)
    incarnation: str = ""  # the buffer process whose counters these are (a restart makes a new one)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def accounted(self) -> int:
        """Groups whose fate is known or pending; equals `put_count` unless a group was lost."""
        return self.get_count + self.dropped + self.size + self.blocked_puts


class ReplayBuffer:
    """A bounded buffer of `BufferItem`s: producers wait when it is full, the learner waits for a full batch.

    Args:
        config: capacity, staleness bound, order, dynamic-sampling switch and default timeouts.
    """

    def __init__(self, config: BufferConfig | None = None) -> None:
        self.config = config or BufferConfig()
        self.incarnation = uuid.uuid4().hex
        self._items: list[BufferItem] = []  # in put order
        self._policy_version = 0
        self._put_count = 0
        self._offered_by_actor: dict[str, int] = {}
        self._get_count = 0
        self._drops = dict.fromkeys(DROP_REASONS, 0)
        self._blocked_puts = 0
        self._last_staleness: list[int] = []
        self._closed = False
        # Pulsed (set, then replaced) on every change; a waiter re-checks its condition after each pulse.
        self._changed = asyncio.Event()

    async def put(self, item: BufferItem, timeout_s: float | None = None) -> bool:
        """Offers one group; waits while the buffer is full.

        Args:
            item: the group's description, its ref inside.
            timeout_s: how long to wait for room; None takes `config.put_timeout_s` (where None means no limit).

        Returns:
            True when the group was stored. False when it was dropped instead, counted under its reason: uniform
            rewards (if configured), stale, no room within the timeout, or the buffer closed.
        """
        self._put_count += 1
        self._offered_by_actor[item.actor_id] = self._offered_by_actor.get(item.actor_id, 0) + 1
        if self.config.drop_uniform_reward_groups and item.uniform_reward:
            return self._drop("uniform_reward")
        if self._is_stale(item):  # versions only increase: no point making the producer wait for it
            return self._drop("stale")
        if not self._has_room():
            self._blocked_puts += 1
            try:
                await self._wait_for(self._has_room, self.config.put_timeout_s if timeout_s is None else timeout_s)
            finally:
                self._blocked_puts -= 1
        if self._closed:
            return self._drop("closed")
        if not self._has_room():
            return self._drop("put_timeout")
        if self._is_stale(item):  # the learner may have moved on during the wait
            return self._drop("stale")
        self._items.append(item)
        self._notify()
        return True

    async def put_many(self, items: list[BufferItem], timeout_s: float | None = None) -> int:
        """Offers several groups in one call (a producer's batch), in order, each as `put` would.

        Args:
            items: the groups' descriptions.
            timeout_s: each group's wait for room, as in `put`.

        Returns:
            How many were stored (the others were dropped and counted under their reason).
        """
        return sum([await self.put(item, timeout_s) for item in items])

    async def get(self, batch_size: int, timeout_s: float | None = None) -> list[BufferItem]:
        """Takes up to `batch_size` groups in the configured order; waits for a full batch until the timeout.

        Args:
            batch_size: groups wanted, 1..capacity (a bigger batch could never fill).
            timeout_s: how long to wait for a full batch; None takes `config.get_timeout_s` (None: no limit).

        Returns:
            Between 0 and `batch_size` items; fewer only when the timeout passed or the buffer closed.
        """
        if not (isinstance(batch_size, int) and 1 <= batch_size <= self.config.capacity):
            raise ValueError(
                f"get: batch_size must be an integer in [1, capacity={self.config.capacity}]; got {batch_size!r}"
            )
        timeout_s = self.config.get_timeout_s if timeout_s is None else timeout_s
        await self._wait_for(lambda: len(self._items) >= batch_size, timeout_s)
        if self.config.order == "fifo":
            batch, self._items = self._items[:batch_size], self._items[batch_size:]
        else:  # "newest": highest policy version first, later puts first among equals
            ranked = sorted(range(len(self._items)), key=lambda i: (self._items[i].policy_version, i), reverse=True)
            taken = set(ranked[:batch_size])
            batch = [self._items[i] for i in ranked[:batch_size]]
            self._items = [it for i, it in enumerate(self._items) if i not in taken]
        self._get_count += len(batch)
        self._last_staleness = [self._policy_version - it.policy_version for it in batch]
        if batch:
            self._notify()
        return batch

    def set_policy_version(self, version: int) -> None:
        """Records the learner's current weights version and drops the groups it made too stale.

        Staleness is checked here and at `put` (after any wait), so the buffer never holds a stale group and `get`
        needs no check of its own.
        """
        if version < self._policy_version:
            raise ValueError(f"set_policy_version: versions only increase; got {version} after {self._policy_version}")
        self._policy_version = version
        fresh = [it for it in self._items if not self._is_stale(it)]
        if len(fresh) < len(self._items):
            self._drops["stale"] += len(self._items) - len(fresh)
            self._items = fresh
            self._notify()

    def drop_actor(self, actor_id: str) -> int:
        """Drops every group from `actor_id` (its process died: it owned their objects, so they can't be read).

        Returns:
            How many groups were dropped (counted as "actor_died").
        """
        kept = [it for it in self._items if it.actor_id != actor_id]
        dropped = len(self._items) - len(kept)
        if dropped:
            self._drops["actor_died"] += dropped
            self._items = kept
            self._notify()
        return dropped

    def stats(self) -> BufferStats:
        staleness = self._last_staleness
        return BufferStats(
            size=len(self._items),
            capacity=self.config.capacity,
            policy_version=self._policy_version,
            put_count=self._put_count,
            get_count=self._get_count,
            drops=dict(self._drops),
            blocked_puts=self._blocked_puts,
            last_batch_staleness_mean=float(np.mean(staleness)) if staleness else 0.0,
            last_batch_staleness_max=max(staleness, default=0),
            last_batch_staleness=tuple(staleness),
            offered_by_actor=dict(self._offered_by_actor),
            incarnation=self.incarnation,
        )

    def close(self) -> None:
        """Wakes every waiter: blocked puts drop their group ("closed"), blocked gets return what there is."""
        self._closed = True
        self._notify()

    def _has_room(self) -> bool:
        return len(self._items) < self.config.capacity

    def _is_stale(self, item: BufferItem) -> bool:
        return self._policy_version - item.policy_version > self.config.max_staleness

    def _drop(self, reason: str) -> bool:
        self._drops[reason] += 1
        return False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for(self, ready: Callable[[], bool], timeout_s: float | None) -> None:
        """Returns once `ready()` holds, the buffer is closed, or `timeout_s` has passed (None: no limit)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not ready() and not self._closed:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return
