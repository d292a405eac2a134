"""Rollout scheduling and the metrics it reports.

- the config cross-checks that keep a schedule from dropping the groups it waits for, with errors naming the key;
- the fleet's figures (rates summed over actors that run at the same time, idle shares) and the trained batch's
(end to end, test_train.py's two-node run makes exactly the groups it trains on).
"""

from __future__ import annotations

import pytest

from actors.rollout_actor import RoundStats
from launch.monitor import batch_metrics, fleet_metrics
from launch.train import load_config
from replay import BufferItem, BufferStats
from replay.buffer import DROP_REASONS


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (
            ["trainer.mode=async", "buffer.max_staleness=1", "weight_sync.every_steps=2"],
            ["buffer.max_staleness", ">= weight_sync.every_steps = 2", "trainer.mode=async", "got 1"],
        ),
        (["trainer.mode=async", "buffer.max_staleness=0"], ["buffer.max_staleness", ">= weight_sync.every_steps = 1"]),
        (["trainer.groups_per_step=8", "buffer.capacity=7"], ["buffer.capacity", ">= 8", "got 7"]),
        (
            ["trainer.mode=async", "buffer.max_staleness=1", "trainer.groups_per_step=8", "buffer.capacity=16"],
            ["buffer.capacity", "<= 7", "buffer.max_staleness=1", "got 16"],
        ),
    ],
)
def test_schedules_that_would_drop_what_they_wait_for_are_refused(overrides, names):
    with pytest.raises(ValueError) as error:
        load_config(overrides)
    for name in names:
        assert name in str(error.value)


def test_schedules_that_drop_nothing_are_accepted():
    # async: the round a broadcast waits for is every_steps versions old; sync: nothing waits across a broadcast
    config, _ = load_config(["trainer.mode=async", "buffer.max_staleness=3", "weight_sync.every_steps=3"])
    assert config.buffer.max_staleness == 3
    config, _ = load_config(["weight_sync.every_steps=3", "trainer.groups_per_step=8", "buffer.capacity=8"])
    assert (config.buffer.max_staleness, config.buffer.capacity) == (0, 8)


def _round(tokens: int, generation_s: float, env_steps: int, env_s: float, num_groups: int = 2) -> RoundStats:
    return RoundStats(
        policy_version=0, incarnation="x", num_groups=num_groups, num_skipped=0, num_responses=4 * num_groups,
        num_accepted=num_groups, tokens_generated=tokens, generation_s=generation_s, env_s=env_s, push_s=0.0,
        round_s=generation_s + env_s, tokens_per_s=tokens / generation_s, env_steps=env_steps,
        env_steps_per_s=env_steps / env_s, invalid_action_rate=0.0, truncated_rate=0.0, reward_mean={},
    )  # fmt: skip


def test_fleet_rates_are_sums_over_concurrent_actors_and_idle_shares_are_of_wall_time():
    # Actor 0 ran two rounds (100 + 300 tokens in 1 + 3 s: 100 tok/s), actor 1 one (200 tokens in 1 s), in a 10 s window
    rounds = [(0, _round(100, 1.0, 50, 0.5)), (1, _round(200, 1.0, 30, 1.0)), (0, _round(300, 3.0, 150, 1.5))]
    metrics = fleet_metrics(rounds, num_actors=2, window_s=10.0, wait_s=6.0)
    assert metrics["perf/gen_tokens_per_s"] == pytest.approx(100.0 + 200.0)  # not the mean of per-round rates
    assert metrics["perf/env_steps_per_s"] == pytest.approx(100.0 + 30.0)
    assert metrics["perf/engine_idle_share"] == pytest.approx(1 - 5.0 / 20.0)  # 5 s of generate in 2 x 10 s
    assert metrics["perf/learner_idle_share"] == pytest.approx(0.6)
    assert metrics["rollout/groups_made"] == 6


def test_batch_rewards_are_the_trained_groups_and_staleness_is_per_group():
    def item(game: str, total: float, version: int) -> BufferItem:
        return BufferItem(
            ref=None, game=game, state_id=f"{game}-{total}", policy_version=version, uniform_reward=False,
            group_size=4, actor_id="rollout-0",
            reward_mean={"total": total, "game": total - 1.0, "format": 1.0, "perception": 0.0},
        )  # fmt: skip

    items = [item("tetris", 2.0, 3), item("swap", 0.0, 2), item("swap", 1.0, 3)]
    drops = dict.fromkeys(DROP_REASONS, 0) | {"stale": 2, "actor_died": 5}
    stats = BufferStats(
        size=1, capacity=8, policy_version=3, put_count=11, get_count=3, drops=drops, blocked_puts=0,
        last_batch_staleness_mean=1 / 3, last_batch_staleness_max=1, last_batch_staleness=(0, 1, 0),
    )  # fmt: skip
    scalars, histograms = batch_metrics(items, stats)
    assert scalars["reward/total"] == pytest.approx(1.0) and scalars["reward/game"] == pytest.approx(0.0)
    assert scalars["reward/swap/total"] == pytest.approx(0.5) and scalars["reward/tetris/total"] == 2.0
    assert scalars["buffer/dropped"] == 2  # the dead actor's 5 are faults/lost_groups, not counted twice
    assert histograms == {"buffer/staleness": [0, 1, 0]}
