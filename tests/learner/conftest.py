"""Fixtures of the learner tests: trajectory groups for the tiny model (synthetic, or sampled by the real vLLM engine),
and shared learner groups.

DeepSpeed worlds are the expensive part (a Ray actor per rank, DeepSpeed init, model load), so the test modules share
session-scoped groups: `learners_2` (the 2-rank group most tests use) and `learners_1` (its 1-rank twin for the
equivalence test). Each test that changes their state says so and does not rely on the state others leave behind; a
test that needs them as they started calls `reset_learners` (their first checkpoint, saved when they were built).
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
from PIL import Image

from actors.config import RolloutConfig
from actors.rollout_actor import RolloutActor
from actors.vllm_engine import VLLMEngine
from actors.vocab import allowed_token_ids
from envs import GameSpec, PoolConfig
from envs.base import Reward
from replay.trajectory import TrajectoryGroup

# Learners on 2 cores: half a CPU each leaves room in the 4-CPU test cluster for the vLLM engine actors.
LEARNER_CPUS = 0.5


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def make_groups(processor):
    """`make_groups(n, seed, group_size=4)`: n groups with random boards, prompts as the engine sees them (image pads
    expanded), random allowed response tokens of varied lengths, made-up sampler log-probs and distinct rewards."""
    allowed = np.array(allowed_token_ids(processor.tokenizer))

    def make(n: int, seed: int, group_size: int = 4) -> list[TrajectoryGroup]:
        rng = np.random.default_rng(seed)
        groups = []
        for i in range(n):
            image = rng.integers(0, 256, (56 + 14 * (i % 3), 84, 3), dtype=np.uint8)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"board {i}"}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = processor(text=[text], images=[Image.fromarray(image)])["input_ids"][0]
            responses = [rng.choice(allowed, size=int(rng.integers(2, 12))).tolist() for _ in range(group_size)]
            rewards = [Reward(float(g % 2), 0.5, 0.0, float(g % 2) + 0.1 * g, True) for g in range(group_size)]
            groups.append(
                TrajectoryGroup(
                    game="tetris",
                    state_id=f"test-{seed}-{i}",
                    image=image,
                    prompt_text=text,
                    prompt_ids=list(prompt_ids),
                    response_ids=responses,
                    response_logprobs=[(-3.0 * rng.random(len(r))).tolist() for r in responses],
                    response_texts=[processor.tokenizer.decode(r) for r in responses],
                    rewards=rewards,
                    policy_version=0,
                    text_observation="board",
                )
            )
        return groups

    return make


def _learner_group(model_dir, num_learners: int, sync_timeout_s: float = 600.0, grpo=None, **overrides):
    from learner import GRPOConfig, LearnerConfig, LearnerGroup, WeightSyncConfig

    config = LearnerConfig(
        model_dir=str(model_dir),
        num=num_learners,
        lr=1e-2,  # large enough that one step visibly changes a random tiny model's greedy outputs
        micro_batch_size=3,
        gradient_checkpointing=True,
        # 0: shard every tensor, however small (the test must exercise ZeRO-3), unless a test overrides it.
        **{"param_persistence_threshold": 0, **overrides},
    )
    # Two optimizer steps per update (old log-probs precomputed), the paper's KL term (a reference model) and an
    # entropy bonus: every loss path runs in the shared worlds.
    grpo = grpo or GRPOConfig(num_minibatches=2, is_cap=2.0, kl_coef=1e-2, entropy_coef=1e-3)
    sync = WeightSyncConfig(bucket_mb=1, timeout_s=sync_timeout_s)
    return LearnerGroup(config, grpo, sync, num_cpus=LEARNER_CPUS)


@pytest.fixture(scope="session")
def new_learner_group(ray_local, tiny_model_dir):
    """`new_learner_group(num_learners, sync_timeout_s=600, model_dir=tiny, grpo=None, **LearnerConfig overrides)`: a
    learner group of its own (a new DeepSpeed world, ~10 s; `grpo`: a GRPOConfig instead of the shared groups'); the
    caller shuts it down."""
    return lambda num, model_dir=tiny_model_dir, **overrides: _learner_group(model_dir, num, **overrides)


@pytest.fixture(scope="session")
def _initial_checkpoints() -> dict:
    return {}


@pytest.fixture(scope="session")
def reset_learners(_initial_checkpoints):
    """`reset_learners(*groups)`: the shared groups back to how they started (weights, optimizer, step, RNG)."""
    return lambda *groups: [group.load_checkpoint(_initial_checkpoints[group]) for group in groups]


def _shared_group(model_dir, num_learners: int, root, checkpoints: dict):
    group = _learner_group(model_dir, num_learners)
    checkpoints[group] = group.save_checkpoint(str(root), {}, keep_last=0)
    return group


@pytest.fixture(scope="session")
def learners_2(ray_local, tiny_model_dir, tmp_path_factory, _initial_checkpoints):
    group = _shared_group(tiny_model_dir, 2, tmp_path_factory.mktemp("learners_2"), _initial_checkpoints)
    yield group
    group.shutdown()


@pytest.fixture(scope="session")
def learners_1(ray_local, tiny_model_dir, tmp_path_factory, _initial_checkpoints):
    group = _shared_group(tiny_model_dir, 1, tmp_path_factory.mktemp("learners_1"), _initial_checkpoints)
    yield group
    group.shutdown()


# The sampler of `sampled_groups`: fp32 like the learners (vLLM-CPU's dtype "auto" would run the tiny model in bf16).
SAMPLER_CONFIG = RolloutConfig(
    group_size=4, states_per_round=12, max_new_tokens=12, max_model_len=1024, dtype="float32", cpu_kv_cache_gib=1
)


@pytest.fixture(scope="session")
def sampled_groups(ray_local, tiny_model_dir):
    """`sampled_groups(n, seed)`: n groups whose responses and log-probs the real vLLM engine sampled (temperature 1,
    the tiny model's initial weights: the learners' own log-probs before any update), on full-size boards of Tetris
    and 2048 with the rollout actor's prompts; one round per session. Each response is cut to a random length (a
    prefix keeps its log-probs) and the rewards are made distinct, so every group has non-zero advantages."""
    import ray

    pool = PoolConfig(games=(GameSpec("tetris"), GameSpec("2048")), num_games=4, seed=0)
    actor = ray.remote(num_cpus=0.5)(RolloutActor).remote(SAMPLER_CONFIG, pool, str(tiny_model_dir))
    sampled = ray.get(actor.run_round.remote()).groups
    ray.kill(actor)

    def make(n: int, seed: int) -> list[TrajectoryGroup]:
        rng = np.random.default_rng(seed)
        groups = []
        for i in rng.choice(len(sampled), size=n, replace=False):
            group = sampled[i]
            cut = [int(rng.integers(2, len(ids) + 1)) for ids in group.response_ids]
            size = group.group_size
            groups.append(
                dataclasses.replace(
                    group,
                    state_id=f"sampled-{seed}-{i}",
                    response_ids=[ids[:t] for ids, t in zip(group.response_ids, cut, strict=True)],
                    response_logprobs=[lp[:t] for lp, t in zip(group.response_logprobs, cut, strict=True)],
                    rewards=[Reward(float(g % 2), 0.5, 0.0, float(g % 2) + 0.1 * g, True) for g in range(size)],
                    finished=[False] * size,
                )
            )
        return groups

    return make


class SyncedEngine(VLLMEngine):
    """The actors' vLLM engine (CPU, in-process) plus what the tests inspect. Run as a Ray actor."""

    CONFIG = RolloutConfig(max_new_tokens=12, max_model_len=1024, cpu_kv_cache_gib=1)

    def __init__(self, model_dir: str):
        super().__init__(model_dir, self.CONFIG)

    def rebuild(self, model_dir: str) -> None:
        """A new engine on `model_dir` in this process: a restart without re-importing vLLM (~25 s on 2 busy cores).
        The old engine-core process and loop thread are stopped first."""
        self.shutdown()
        gc.collect()
        super().__init__(model_dir, self.CONFIG)

    def checksums(self) -> dict[str, str]:
        return self.collective_rpc("weight_checksums")[0]

    def greedy(self, prompts: list[tuple[str, np.ndarray]]) -> list[list[int]]:
        params = self.sampling_params(n=1, temperature=0.0, top_p=1.0, max_tokens=self.CONFIG.max_new_tokens)
        requests = [{"prompt": text, "multi_modal_data": {"image": Image.fromarray(image)}} for text, image in prompts]
        return [list(out.outputs[0].token_ids) for out in self.generate(requests, params)]


@pytest.fixture(scope="session")
def start_engine(ray_local):
    """`start_engine(*model_dirs)`: SyncedEngine Ray actors, started together; all are killed at the session's end."""
    import sys

    import ray

    # Test-local class: pickle it by value, Ray workers cannot import this conftest module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    remote = ray.remote(num_cpus=0.5)(SyncedEngine)
    started = []

    def start(*model_dirs) -> list[ray.actor.ActorHandle]:
        engines = [remote.remote(str(d)) for d in model_dirs]
        ray.get([e.__ray_ready__.remote() for e in engines])
        started.extend(engines)
        return engines

    yield start
    for engine in started:
        ray.kill(engine)
