"""Tests of the trajectory buffer: the plain class driven by asyncio, then the same class as a real Ray async actor."""

from __future__ import annotations

import asyncio
import pickle
import random
import sys
import time

import numpy as np
import pytest
import ray

from envs.base import Reward
from replay import BufferConfig, BufferItem, BufferStats, ReplayBuffer, TrajectoryGroup


def make_item(state_id: str, version: int = 0, uniform: bool = False, actor_id: str = "a0") -> BufferItem:
    """An item whose ref is a stand-in: the plain class never looks inside it."""
    return BufferItem(
        ref=None, game="tetris", state_id=state_id, policy_version=version, uniform_reward=uniform, group_size=4,
        actor_id=actor_id,
    )  # fmt: skip


def make_group(state_id: str, version: int = 0, rewards: tuple[float, ...] = (0.0, 1.0), side: int = 16):
    g = len(rewards)
    return TrajectoryGroup(
        game="tetris",
        state_id=state_id,
        image=np.random.default_rng(len(state_id)).integers(0, 256, (side, side, 3), dtype=np.uint8),
        prompt_text="<prompt>",
        prompt_ids=[1, 2, 3],
        response_ids=[[4, 5]] * g,
        response_logprobs=[[-0.5, -0.25]] * g,
        response_texts=["<answer>left</answer>"] * g,
        rewards=[Reward(game=r, format=1.0, perception=0.0, total=r, valid_action=True) for r in rewards],
        policy_version=version,
        text_observation="board",
        finished=[True] * g,
    )


def ids(items: list[BufferItem]) -> list[str]:
    return [item.state_id for item in items]


def assert_balanced(stats: BufferStats) -> None:
    assert stats.put_count == stats.accounted == stats.get_count + stats.dropped + stats.size + stats.blocked_puts


# ---- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"capacity": 0}, "'capacity' must be an integer >= 1; got 0"),
        ({"capacity": True}, "'capacity' must be an integer >= 1"),
        ({"max_staleness": -1}, "'max_staleness' must be an integer >= 0"),
        ({"order": "lifo"}, "'order' must be one of 'fifo', 'newest'; got 'lifo'"),
        ({"drop_uniform_reward_groups": "yes"}, "'drop_uniform_reward_groups' must be a boolean"),
        ({"put_timeout_s": -1.0}, "'put_timeout_s' must be a number >= 0, or null"),
        ({"get_timeout_s": "10"}, "'get_timeout_s' must be a number >= 0, or null"),
    ],
)
def test_config_rejects_bad_values_naming_key_and_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        BufferConfig(**override)


def test_get_rejects_batch_size_outside_capacity():
    buffer = ReplayBuffer(BufferConfig(capacity=4))
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, capacity=4\]"):
            asyncio.run(buffer.get(bad, timeout_s=0))


# ---- the plain class under asyncio --------------------------------------------------------------------------------
def test_drop_actor_removes_only_that_actors_groups_and_counts_them():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=8))
        for i, actor in enumerate(["a0", "a1", "a0", "a1"]):
            assert await buffer.put(make_item(f"s{i}", actor_id=actor))
        assert buffer.drop_actor("a0") == 2
        assert buffer.drop_actor("a0") == 0
        assert ids(await buffer.get(2, timeout_s=0)) == ["s1", "s3"]
        stats = buffer.stats()
        assert stats.drops["actor_died"] == 2
        assert_balanced(stats)

    asyncio.run(scenario())


def test_put_blocks_while_full_and_resumes_when_get_frees_room():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=2))
        assert await buffer.put(make_item("s0")) and await buffer.put(make_item("s1"))
        blocked = asyncio.create_task(buffer.put(make_item("s2")))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        assert (buffer.stats().blocked_puts, buffer.stats().size) == (1, 2)
        assert ids(await buffer.get(1, timeout_s=0)) == ["s0"]
        assert await asyncio.wait_for(blocked, 1.0) is True
        assert (buffer.stats().blocked_puts, buffer.stats().size) == (0, 2)
        assert ids(await buffer.get(2, timeout_s=0)) == ["s1", "s2"]

    asyncio.run(scenario())


def test_put_many_stores_in_order_counts_drops_and_waits_for_room_item_by_item():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=3, max_staleness=0, drop_uniform_reward_groups=True))
        buffer.set_policy_version(1)
        batch = [make_item("a", 1), make_item("stale", 0), make_item("flat", 1, uniform=True), make_item("b", 1)]
        assert await buffer.put_many(batch) == 2  # stored: a, b; dropped and counted: stale, flat
        stats = buffer.stats()
        assert (stats.put_count, stats.drops["stale"], stats.drops["uniform_reward"]) == (4, 1, 1)
        # the third fits, the fourth waits for room (back-pressure) until a get frees it
        blocked = asyncio.create_task(buffer.put_many([make_item("c", 1), make_item("d", 1)]))
        await asyncio.sleep(0.05)
        assert not blocked.done() and buffer.stats().blocked_puts == 1
        assert ids(await buffer.get(1, timeout_s=0)) == ["a"]
        assert await asyncio.wait_for(blocked, 1.0) == 2
        assert ids(await buffer.get(3, timeout_s=0)) == ["b", "c", "d"]
        buffer.close()
        assert await buffer.put_many([make_item("late", 1)]) == 0 and buffer.stats().drops["closed"] == 1
        assert_balanced(buffer.stats())

    asyncio.run(scenario())


def test_put_timeout_returns_false_counts_and_never_grows_past_capacity():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=1, put_timeout_s=0.02))
        assert await buffer.put(make_item("s0"))
        assert await buffer.put(make_item("s1")) is False  # the config's timeout
        assert await buffer.put(make_item("s2"), timeout_s=0.01) is False  # the call's own
        stats = buffer.stats()
        assert (stats.size, stats.put_count, stats.drops["put_timeout"]) == (1, 3, 2)
        assert_balanced(stats)

    asyncio.run(scenario())


def test_get_waits_for_a_full_batch_and_returns_fewer_only_on_timeout():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=8))
        waiting = asyncio.create_task(buffer.get(3, timeout_s=5.0))
        for i in range(2):
            await buffer.put(make_item(f"s{i}"))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        await buffer.put(make_item("s2"))
        assert ids(await asyncio.wait_for(waiting, 1.0)) == ["s0", "s1", "s2"]

        for i in range(3, 8):
            await buffer.put(make_item(f"s{i}"))
        assert ids(await buffer.get(2, timeout_s=0)) == ["s3", "s4"]  # never more than asked
        start = time.perf_counter()
        assert ids(await buffer.get(5, timeout_s=0.05)) == ["s5", "s6", "s7"]
        assert time.perf_counter() - start >= 0.04
        assert buffer.stats().get_count == 8

    asyncio.run(scenario())


def test_stale_groups_are_dropped_at_version_bump_and_at_put():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=3, max_staleness=1))
        for version in (0, 1, 2):
            assert await buffer.put(make_item(f"v{version}", version))
        blocked = asyncio.create_task(buffer.put(make_item("v2b", 2)))
        await asyncio.sleep(0.01)
        assert not blocked.done()

        buffer.set_policy_version(2)  # v0 lags by 2 > 1: dropped, which frees room for the blocked put
        assert await asyncio.wait_for(blocked, 1.0) is True
        assert await buffer.put(make_item("late", 0)) is False  # already stale on arrival
        assert buffer.stats().drops["stale"] == 2

        batch = await buffer.get(3, timeout_s=0)
        assert ids(batch) == ["v1", "v2", "v2b"]
        stats = buffer.stats()
        assert (stats.last_batch_staleness_max, stats.last_batch_staleness_mean) == (1, pytest.approx(1 / 3))
        assert_balanced(stats)
        with pytest.raises(ValueError, match="versions only increase; got 1 after 2"):
            buffer.set_policy_version(1)

    asyncio.run(scenario())


def test_put_that_waited_drops_a_group_gone_stale_meanwhile():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=1, max_staleness=0))
        assert await buffer.put(make_item("new", 5))
        blocked = asyncio.create_task(buffer.put(make_item("old", 0)))
        await asyncio.sleep(0.01)
        buffer.set_policy_version(1)  # "old" (version 0) is now stale, "new" (version 5) is not
        assert ids(await buffer.get(1, timeout_s=0)) == ["new"]
        assert await asyncio.wait_for(blocked, 1.0) is False
        assert buffer.stats().drops["stale"] == 1 and buffer.stats().size == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("drop", [True, False])
def test_uniform_reward_groups_dropped_only_when_configured(drop):
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(drop_uniform_reward_groups=drop))
        assert await buffer.put(make_item("flat", uniform=True)) is (not drop)
        assert await buffer.put(make_item("signal", uniform=False))
        expected = ["signal"] if drop else ["flat", "signal"]
        assert ids(await buffer.get(2, timeout_s=0)) == expected
        assert buffer.stats().drops["uniform_reward"] == int(drop)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("order", "expected"), [("fifo", ["s0", "s1", "s2"]), ("newest", ["s3", "s1", "s2"])]
)  # fmt: skip
def test_order_fifo_or_freshest_first(order, expected):
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(order=order, max_staleness=5))
        for state_id, version in [("s0", 0), ("s1", 2), ("s2", 1), ("s3", 2)]:
            await buffer.put(make_item(state_id, version))
        assert ids(await buffer.get(3, timeout_s=0)) == expected
        assert buffer.stats().size == 1

    asyncio.run(scenario())


def test_close_wakes_waiting_puts_and_gets():
    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=1))
        await buffer.put(make_item("s0"))
        blocked_put = asyncio.create_task(buffer.put(make_item("s1")))
        await asyncio.sleep(0.01)
        buffer.close()
        assert await asyncio.wait_for(blocked_put, 1.0) is False
        assert ids(await asyncio.wait_for(buffer.get(1), 1.0)) == ["s0"]
        assert await asyncio.wait_for(buffer.get(1), 1.0) == []  # closed and empty: no wait for get_timeout_s
        assert buffer.stats().drops["closed"] == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(3))
def test_concurrent_producers_lose_nothing(seed):
    """Random interleavings of producers, a consumer and version bumps: every group is out once or counted."""
    rng = random.Random(seed)

    async def produce(buffer, actor, stored, refused):
        for i in range(40):
            version = max(0, buffer.stats().policy_version - rng.randint(0, 2))
            item = make_item(f"{actor}-{i}", version, uniform=rng.random() < 0.2)
            (stored if await buffer.put(item, timeout_s=rng.choice([0.0, 0.002, None])) else refused).append(item)
            await asyncio.sleep(0)

    async def scenario():
        buffer = ReplayBuffer(BufferConfig(capacity=5, max_staleness=1, drop_uniform_reward_groups=True))
        stored, refused, out = [], [], []
        producers = asyncio.gather(*(produce(buffer, f"a{k}", stored, refused) for k in range(3)))
        while not producers.done():
            out += await buffer.get(rng.randint(1, 5), timeout_s=0.001)
            if rng.random() < 0.2:
                buffer.set_policy_version(buffer.stats().policy_version + 1)
            assert_balanced(buffer.stats())
        await producers
        return buffer.stats(), stored, refused, out

    stats, stored, refused, out = asyncio.run(scenario())
    assert stats.put_count == 120 == len(stored) + len(refused)
    assert len(set(ids(out))) == len(out) and set(ids(out)) <= set(ids(stored))
    assert not any(item.uniform_reward for item in out)
    # stored groups that did not come out went stale inside the buffer: every other drop is a refused put
    assert len(stored) - len(out) - stats.size == stats.dropped - len(refused)
    assert_balanced(stats)


# ---- as a real Ray async actor ------------------------------------------------------------------------------------
RemoteBuffer = ray.remote(ReplayBuffer)
# Ray workers can't import this test module by name: ship the Producer class below by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_ray_put_blocks_producers_until_a_get_frees_room(ray_local):
    buffer = RemoteBuffer.remote(BufferConfig(capacity=2))
    items = [BufferItem.from_group(make_group(f"s{i}"), "driver") for i in range(4)]
    # one at a time: an async actor may start calls submitted together in any order
    assert ray.get(buffer.put.remote(items[0])) and ray.get(buffer.put.remote(items[1]))
    assert ray.get(buffer.put.remote(items[2], timeout_s=0.3)) is False

    pending = buffer.put.remote(items[3])  # no timeout: waits for room as long as it takes
    wait_until(lambda: ray.get(buffer.stats.remote()).blocked_puts == 1)
    assert ray.wait([pending], timeout=0.3)[0] == []
    assert ids(ray.get(buffer.get.remote(1, timeout_s=0))) == ["s0"]  # runs while the put is blocked
    assert ray.get(pending, timeout=10) is True

    assert ids(ray.get(buffer.get.remote(2, timeout_s=0))) == ["s1", "s3"]
    stats = ray.get(buffer.stats.remote())
    assert (stats.put_count, stats.get_count, stats.drops["put_timeout"], stats.size) == (4, 3, 1, 0)


def test_ray_group_travels_by_reference_and_comes_back_equal(ray_local):
    group = make_group("big", version=3, rewards=(0.0, 0.5, 1.0), side=256)
    item = BufferItem.from_group(group, "driver")
    assert (item.uniform_reward, item.group_size, item.policy_version) == (False, 3, 3)
    assert BufferItem.from_group(make_group("flat", rewards=(1.0, 1.0)), "driver").uniform_reward

    buffer = RemoteBuffer.remote(BufferConfig(max_staleness=5))
    assert ray.get(buffer.put.remote(item))
    (out,) = ray.get(buffer.get.remote(1, timeout_s=1.0))
    assert isinstance(out.ref, ray.ObjectRef) and out.ref == item.ref  # the buffer never resolved it
    # what crossed into and out of the buffer process is the ref and a few fields, not the 196 KB image
    assert len(pickle.dumps(out)) < 1000 < 190_000 < len(pickle.dumps(group))

    fetched = ray.get(out.ref)
    np.testing.assert_array_equal(fetched.image, group.image)
    assert not fetched.image.flags.writeable  # read in place from the object store, not copied
    assert (fetched.state_id, fetched.rewards, fetched.response_ids) == (
        group.state_id,
        group.rewards,
        group.response_ids,
    )


@ray.remote(num_cpus=0)
class Producer:
    """A stand-in rollout actor: stamps groups with a version at most 2 behind the buffer's and puts them."""

    def __init__(self, buffer, actor_id: str) -> None:
        self.buffer, self.actor_id = buffer, actor_id

    def produce(self, n: int) -> list[tuple[str, bool, bool]]:
        results = []
        for i in range(n):
            version = max(0, ray.get(self.buffer.stats.remote()).policy_version - i % 3)
            rewards = (1.0, 1.0) if i % 5 == 0 else (0.0, 1.0)
            item = BufferItem.from_group(make_group(f"{self.actor_id}-{i}", version, rewards), self.actor_id)
            results.append((item.state_id, item.uniform_reward, ray.get(self.buffer.put.remote(item))))
        return results


def test_ray_many_producers_one_consumer_lose_nothing(ray_local):
    config = BufferConfig(capacity=4, max_staleness=1, drop_uniform_reward_groups=True)
    buffer = RemoteBuffer.remote(config)
    producers = [Producer.remote(buffer, f"a{k}") for k in range(3)]
    futures = [p.produce.remote(30) for p in producers]
    out, gets = [], 0
    while True:
        finished = len(ray.wait(futures, num_returns=len(futures), timeout=0)[0]) == len(futures)
        batch = ray.get(buffer.get.remote(3, timeout_s=0.2))
        time.sleep(0.03)  # a learner step: slower than the producers, so their puts must wait
        out += batch
        gets += 1
        if gets % 4 == 0:
            ray.get(buffer.set_policy_version.remote(gets // 4))
        if finished and not batch:
            break

    results = [r for rs in ray.get(futures) for r in rs]
    stored = {state_id for state_id, _, ok in results if ok}
    stats = ray.get(buffer.stats.remote())
    assert stats.put_count == len(results) == 90
    assert len(set(ids(out))) == len(out) and set(ids(out)) <= stored
    assert stats.drops["uniform_reward"] == sum(uniform for _, uniform, _ in results) == 18
    assert stats.size == 0 and stats.get_count == len(out)
    assert_balanced(stats)
    assert len(stored) - len(out) + sum(not ok for *_, ok in results) == stats.dropped  # the rest went stale inside
    fetched = ray.get([item.ref for item in out])  # every group handed out is still readable
    assert [g.state_id for g in fetched] == ids(out)
