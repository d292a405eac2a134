"""A rollout actor as a real Ray actor with the real vLLM CPU engine, feeding a real ReplayBuffer actor: rounds, then
continuous generation (`stream`) with back-pressure, an early stop, a weight load mid-stream, and the buffer's closing.

The groups are read back the learner's way: items from `buffer.get`, groups from the object store by their refs.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import numpy as np
import pytest
import ray
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

import envs
from actors.config import RolloutConfig
from actors.rollout_actor import RolloutActor
from envs import GamePool, GameSpec, PoolConfig
from replay import BufferConfig, ReplayBuffer

G = 4
STATES = 4
ACTOR_ID = 1
CONFIG = RolloutConfig(group_size=G, states_per_round=STATES, max_new_tokens=32, max_model_len=2048)
CAPACITY = 12
POOL = PoolConfig(games=(GameSpec("2048"), GameSpec("swap")), num_games=4, seed=11)


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_model_dir):
    """(actor, buffer): one rollout actor (its own engine, in its own process) pushing into one buffer actor."""
    buffer = ray.remote(ReplayBuffer).remote(BufferConfig(capacity=CAPACITY, max_staleness=4, get_timeout_s=60.0))
    remote = ray.remote(RolloutActor).options(num_cpus=1, max_concurrency=4)  # threaded, as launch/cluster.py makes it
    actor = remote.remote(CONFIG, POOL, str(tiny_model_dir), ACTOR_ID, buffer)
    yield actor, buffer
    for handle in (actor, buffer):  # free the engine's memory for the modules that follow
        ray.kill(handle)


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    """The tiny model's checkpoint weights, as the learner would push them."""
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()


def round_through_buffer(actor, buffer, num_states=None):
    """Runs one round on the actor; returns its stats and its groups as the learner would read them."""
    result = ray.get(actor.run_round.remote(num_states))
    assert result.groups == []  # with a buffer the groups go there, not back to the caller
    items = ray.get(buffer.get.remote(result.stats.num_groups, timeout_s=30.0))
    # Puts submitted together reach an async actor in any order: restore the round's order (state ids end in it).
    items.sort(key=lambda item: int(item.state_id.rsplit("-", 1)[1]))
    return result.stats, items, ray.get([item.ref for item in items])


def test_groups_reach_the_buffer_with_g_responses_and_logprobs_and_match_an_independent_score(cluster, tiny_model_dir):
    actor, buffer = cluster
    stats, items, groups = round_through_buffer(actor, buffer)
    assert stats.num_groups == stats.num_accepted == len(groups) == STATES and stats.num_skipped == 0
    assert stats.tokens_generated == sum(len(ids) for g in groups for ids in g.response_ids)

    # The same states, rebuilt here from the actor's pool seed: the pool is deterministic.
    states = GamePool.from_config(replace(POOL, seed=POOL.seed + ACTOR_ID)).sample(STATES)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for item, group, state in zip(items, groups, states, strict=True):
        assert (item.actor_id, item.game, item.state_id) == (f"rollout-{ACTOR_ID}", group.game, group.state_id)
        assert item.policy_version == group.policy_version == 0 and item.group_size == G
        assert group.response_versions == [(0, 0)] * G  # every token sampled by the initial weights
        assert group.game == state.game_name and group.text_observation == state.text_observation
        assert np.array_equal(group.image, state.image)
        # the prompt ids are the templated prompt with its one image pad expanded to the board's patches
        decoded = tokenizer.decode(group.prompt_ids)
        assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", decoded) == group.prompt_text
        assert decoded.count("<|image_pad|>") >= 4 and group.prompt_text.endswith("<|im_start|>assistant\n")
        assert len(group.response_ids) == len(group.response_logprobs) == len(group.rewards) == G
        for ids, logprobs, text, reward, finished in zip(
            group.response_ids,
            group.response_logprobs,
            group.response_texts,
            group.rewards,
            group.finished,
            strict=True,
        ):
            assert len(ids) == len(logprobs) >= 1 and all(lp <= 0 for lp in logprobs)
            assert text == tokenizer.decode(ids, skip_special_tokens=True)  # the scored text is the trained tokens
            assert finished == (ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"))
            assert reward == envs.score(state.game, text)  # recorded reward == an independent score, same state

    assert stats.reward_mean["total"] == pytest.approx(np.mean([r.total for g in groups for r in g.rewards]))
    assert stats.invalid_action_rate == pytest.approx(np.mean([not r.valid_action for g in groups for r in g.rewards]))
    assert 0.0 < stats.generation_s < stats.round_s and stats.tokens_per_s > 0
    assert set(stats.reward_mean_by_game) == {"2048", "swap"}


def test_weights_pushed_through_ray_stamp_the_next_groups_with_their_version(cluster, weights):
    actor, buffer = cluster
    assert ray.get(actor.load_weights.remote(weights, 3))
    stats, items, groups = round_through_buffer(actor, buffer)
    assert stats.policy_version == 3
    assert {item.policy_version for item in items} == {g.policy_version for g in groups} == {3}
    assert ray.get(actor.load_weights.remote(weights, 2)) is False  # older than the engine's: skipped
    assert ray.get(actor.get_policy_version.remote()) == 3


def test_a_round_of_n_states_reports_every_env_step_and_its_throughput(cluster):
    actor, buffer = cluster
    stats, _, groups = round_through_buffer(actor, buffer, num_states=3)  # the driver asks for what a batch needs
    assert len(groups) == stats.num_groups == 3
    # every step taken: the random steps after each reset (2048: 100, swap: 0) and one per scored response
    random_steps = sum(GameSpec(group.game).steps_after_reset for group in groups)
    assert random_steps >= 100 and stats.env_steps == random_steps + 3 * G
    metrics = stats.to_metrics()
    assert metrics["perf/gen_tokens_per_s"] == pytest.approx(stats.tokens_generated / stats.generation_s)
    assert metrics["perf/env_steps_per_s"] == pytest.approx(stats.env_steps / stats.env_s)
    generation = {"rollout/reward_total", "rollout/2048/reward_total", "rollout/swap/reward_format"}
    assert generation | {"rollout/invalid_action_rate"} <= set(metrics)
    assert not any(key.startswith("reward/") for key in metrics)  # reward/* are the trained batch's (launch/monitor)
    assert stats.push_s > 0 and stats.round_s >= stats.generation_s + stats.env_s + stats.push_s - 1e-6


# ---- continuous generation ----------------------------------------------------------------------------------------
def read_groups(buffer, n):
    items = ray.get(buffer.get.remote(n, timeout_s=60.0))
    return items, ray.get([item.ref for item in items])


def assert_every_state_accounted(summary, offered):
    assert summary.num_submitted == summary.num_groups + summary.num_skipped + summary.num_aborted
    assert summary.num_groups == summary.num_pushed + summary.num_unpushed
    assert summary.num_pushed == offered  # what the buffer counted as offered by this actor during the stream


def offered_by(buffer) -> int:
    return ray.get(buffer.stats.remote()).offered_by_actor.get(f"rollout-{ACTOR_ID}", 0)


def test_stream_stalls_on_a_full_buffer_and_stops_after_pushing_its_requests_in_flight(cluster):
    actor, buffer = cluster
    version, offered = ray.get(actor.get_policy_version.remote()), offered_by(buffer)
    assert ray.get(actor.drain_stats.remote()) is None  # nothing streamed yet
    # A stop that a threaded actor runs before the stream sent to it has started is not lost: that stream ends at once,
    # and the stop is used up (the next stream runs).
    ray.get(actor.stop_stream.remote())
    early = ray.get(actor.stream.remote(max_states_in_flight=3), timeout=30)
    assert early.ended_by == "stop" and early.num_submitted == early.num_unprepared == 0
    stream = actor.stream.remote(max_states_in_flight=3)
    deadline = time.monotonic() + 120
    while ray.get(buffer.stats.remote()).blocked_puts == 0:  # full, and the next push waits for room
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # generation stalls: at most 2 x 3 states are submitted and not pushed
    stalled = ray.get(actor.drain_stats.remote())
    assert stalled.num_submitted <= CAPACITY + 2 * 3 and stalled.num_groups <= CAPACITY + 2 * 3
    actor.stop_stream.remote()
    items, groups = read_groups(buffer, CAPACITY)  # room for the groups still waiting
    summary = ray.get(stream)
    items2, groups2 = read_groups(buffer, ray.get(buffer.stats.remote()).size or 1)
    assert summary.ended_by == "stop" and summary.num_aborted == 0 and summary.num_unpushed == 0
    assert_every_state_accounted(summary, offered_by(buffer) - offered)
    assert len(groups) + len(groups2) == summary.num_accepted == summary.num_groups
    for group in groups + groups2:
        assert group.response_versions == [(version, version)] * G and group.policy_version == version
        assert len(group.response_ids) == len(group.response_logprobs) == G
    assert len({g.state_id for g in groups + groups2}) == summary.num_groups
    rest = ray.get(actor.drain_stats.remote())  # None when every group had been scored before the stall's drain
    drained = [stats for stats in (stalled, rest) if stats is not None]
    assert sum(stats.num_submitted for stats in drained) == summary.num_submitted
    assert sum(stats.num_groups for stats in drained) == summary.num_groups
    assert stalled.tokens_generated > 0 and 0 < stalled.generation_s <= stalled.round_s
    assert stalled.tokens_per_s == stalled.tokens_generated / stalled.generation_s
    assert ray.get(actor.drain_stats.remote()) is None


def test_a_weight_load_mid_stream_reaches_requests_in_flight_and_loses_no_group(cluster, weights):
    actor, buffer = cluster
    version, offered = ray.get(actor.get_policy_version.remote()), offered_by(buffer)
    stream = actor.stream.remote(max_states_in_flight=4)
    _, before = read_groups(buffer, 2)  # streaming for real
    # Load while the engine holds requests: a group's scoring and pushing can leave it empty for a moment.
    deadline = time.monotonic() + 60
    while ray.get(actor.requests_in_engine.remote()) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert ray.get(actor.load_weights.remote(weights, version + 1))
    _, after = read_groups(buffer, 6)
    buffer.close.remote()  # ends the stream: its requests in flight are aborted, nothing is pushed any more
    summary = ray.get(stream, timeout=60)
    assert summary.ended_by == "buffer_closed"
    assert_every_state_accounted(summary, offered_by(buffer) - offered)
    spans = [versions for g in before + after for versions in g.response_versions]
    assert (version, version + 1) in spans  # generated partly under each: paused, loaded, resumed
    for group in before + after:
        assert group.policy_version == min(first for first, _ in group.response_versions)
        assert all(version <= first <= last <= version + 1 for first, last in group.response_versions)
