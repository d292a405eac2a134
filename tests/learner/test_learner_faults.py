"""Learner faults on real DeepSpeed worlds: one rank's error or death ends every rank at once, and a random-init
reference model equals the initial policy (tests/launch/test_learner_restart.py restarts a run's learner group)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from learner import LearnerDiedError

# The helpers below run inside learner actors, whose workers cannot import this test module: pickle them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _policy_and_reference(learner) -> list[dict]:
    """The full weights of a learner's policy and of its reference model."""
    return [model._zero3_consolidated_16bit_state_dict() for model in (learner.engine, learner.reference)]


def _pid(learner) -> int:
    return os.getpid()


def _all_dead(group_actors: list, within_s: float = 60) -> bool:
    """Whether every actor is dead within `within_s`. `ray.kill` is asynchronous: a call sent just after it can still
    reach the process before it ends (seen once in CI), so a live answer means "not yet", not "never"."""
    deadline = time.monotonic() + within_s
    for actor in group_actors:
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
    return True


def test_random_init_reference_equals_the_initial_policy(new_learner_group, tiny_model_dir, tmp_path):
    # A model directory with a config and no weights: the learner draws the weights (qwen2_5_vl_3b_random's case).
    config_only = tmp_path / "random"
    shutil.copytree(tiny_model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    group = new_learner_group(1, model_dir=str(config_only))  # grpo.kl_coef > 0: it builds a reference
    try:
        policy, reference = ray.get(group.learners[0].__ray_call__.remote(_policy_and_reference))
        assert policy.keys() == reference.keys() and len(policy) > 10
        assert all(torch.equal(policy[k], reference[k]) for k in policy)
    finally:
        group.shutdown()


def test_an_error_on_one_rank_fails_every_rank_at_once(new_learner_group, make_groups):
    group = new_learner_group(2)
    actors = list(group.learners)
    good, bad = make_groups(2, seed=50)
    # Rank 1's group fails to encode; rank 0's is fine and goes on into the first collective, where it would wait for
    # rank 1 until gloo's timeout (30 min) if the group waited on the ranks in order.
    bad = dataclasses.replace(bad, response_logprobs=[lp[:-1] for lp in bad.response_logprobs])
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(group.update, [good, bad])  # strided shards: rank 0 gets `good`, rank 1 `bad`
        try:
            with pytest.raises(ValueError, match="response ids but .* log-probs"):
                future.result(timeout=120)
        finally:
            if not future.done():  # the check failed: free the thread stuck in ray.get
                group.shutdown()
    assert time.monotonic() - start < 60
    assert _all_dead(actors)  # rank 0, stuck in a collective, was killed too
    with pytest.raises(RuntimeError, match="learner group was shut down"):
        group.update([good, good])


def test_a_dead_rank_is_reported_as_such_and_ends_the_group(new_learner_group, make_groups):
    group = new_learner_group(2)
    actors = list(group.learners)
    pid = ray.get(actors[1].__ray_call__.remote(_pid))
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    start = time.monotonic()
    with pytest.raises(LearnerDiedError, match="learner rank 1 died"):
        group.update(make_groups(2, seed=51))
    assert time.monotonic() - start < 60
    assert _all_dead(actors)
