"""A rollout actor as a real Ray actor with the real vLLM CPU engine, feeding a real ReplayBuffer actor.

The groups are read back the learner's way: items from `buffer.get`, groups from the object store by their refs.
"""

from __future__ import annotations

import re
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
POOL = PoolConfig(games=(GameSpec("2048"), GameSpec("swap")), num_games=4, seed=11)


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_model_dir):
    """(actor, buffer): one rollout actor (its own engine, in its own process) pushing into one buffer actor."""
    buffer = ray.remote(ReplayBuffer).remote(BufferConfig(capacity=32, max_staleness=4, get_timeout_s=60.0))
    actor = ray.remote(RolloutActor).options(num_cpus=1).remote(CONFIG, POOL, str(tiny_model_dir), ACTOR_ID, buffer)
    yield actor, buffer
    for handle in (actor, buffer):  # free the engine's memory for the modules that follow
        ray.kill(handle)


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


def test_weights_pushed_through_ray_stamp_the_next_groups_with_their_version(cluster, tiny_model_dir):
    actor, buffer = cluster
    weights = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
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
