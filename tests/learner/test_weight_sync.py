"""Weight broadcast from the ZeRO-3 learner group to real vLLM engines (on CPU: shared memory on the learner's node,
gloo broadcast elsewhere).

Correctness is checked against a reference engine built from scratch on the learner's consolidated weights (saved as
a Hugging Face checkpoint): equal checksums of every parameter and buffer in vLLM's own layout, and equal greedy
outputs.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from learner import WeightSyncError, checkpoint
from learner.weight_sync import SHM_DIR

# The functions below run inside engine and learner actors, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def engines(start_engine, tiny_model_dir):
    """Two engines under test and a reference engine, rebuilt on whatever checkpoint a test compares against."""
    return start_engine(tiny_model_dir, tiny_model_dir, tiny_model_dir)


def _prompts(make_groups):
    return [(g.prompt_text, g.image) for g in make_groups(4, seed=50)]


def _checksums(engine) -> dict[str, str]:
    return ray.get(engine.checksums.remote())


def _in_workers(engine, fn) -> list:
    """`fn(worker)` in every vLLM worker of an engine actor (in its engine-core process), through AsyncLLM's own
    `collective_rpc`, which takes a function (`VLLMEngine.collective_rpc` takes method names)."""
    return ray.get(engine.__ray_call__.remote(lambda e: e._run(e.llm.collective_rpc(fn))))


def _reads_shm(worker) -> bool:
    return worker.weight_transfer_engine.group.reads_shm


def _segments(learners) -> list[str]:
    """The shared-memory segments of the learner group's current sync group that still have a name."""
    name = ray.get(learners.learners[0].__ray_call__.remote(lambda learner: learner._sync.info.name))
    return glob.glob(f"{SHM_DIR}/{name}-*")


def _fail_second_load(worker) -> None:
    """Runs in a vLLM worker: its next sync fails halfway through loading the second bucket (as running out of memory
    would), leaving layers with some of their tensors loaded."""
    model = worker.weight_transfer_engine.model
    load, calls = model.load_weights, []

    def load_or_fail(weights):
        calls.append(1)
        if len(calls) == 2:
            del model.load_weights  # the model's own method again
            weights = list(weights)
            load(weights[: len(weights) // 2])
            raise RuntimeError("injected: out of memory while loading")
        return load(weights)

    model.load_weights = load_or_fail


def _sockets(_caller) -> int:
    """Open sockets of the calling process (a worker's, or an actor's through `__ray_call__`)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # closed since listed
            pass
    return count


def test_sync_gives_every_engine_the_learners_weights(learners_2, engines, make_groups, tmp_path):
    first, second, reference = engines
    prompts = _prompts(make_groups)
    before = ray.get(first.greedy.remote(prompts))
    learners_2.init_weight_sync([first, second])
    learners_2.update(make_groups(2, seed=51))
    stats = learners_2.sync_weights(version=5)
    assert stats.full and stats.version == 5 and stats.nbytes > 0 and stats.load_s > 0
    # Both engines share the learner's node: transport auto hands them the buckets through shared memory, which both
    # learner ranks write their ZeRO-3 partitions into (no gather).
    assert _in_workers(first, _reads_shm) == _in_workers(second, _reads_shm) == [True] and stats.gather_s == 0
    assert ray.get([e.__ray_call__.remote(lambda self: self.policy_version) for e in (first, second)]) == [5, 5]

    path = learners_2.save_checkpoint(str(tmp_path), {}, keep_last=1)
    ray.get(reference.rebuild.remote(f"{path}/{checkpoint.HF_DIR}"))
    expected = _checksums(reference)
    assert _checksums(first) == expected and _checksums(second) == expected
    after = ray.get(first.greedy.remote(prompts))
    assert after == ray.get(reference.greedy.remote(prompts)) == ray.get(second.greedy.remote(prompts))
    assert after != before

    # A second sync in the same group: nothing is frozen, so it is the same size but no longer a first (full) one.
    learners_2.update(make_groups(2, seed=52))
    again = learners_2.sync_weights(version=6)
    assert not again.full and again.nbytes == stats.nbytes
    assert _checksums(first) != expected and _checksums(first) == _checksums(second)


def test_restarted_engine_gets_current_weights_when_the_group_is_recreated(learners_2, engines, tiny_model_dir):
    first, second, _ = engines
    learners_2.init_weight_sync([first, second])
    learners_2.sync_weights(version=7)
    current = _checksums(first)
    ray.get(second.rebuild.remote(str(tiny_model_dir)))  # restarted: back to the model directory's weights
    assert _checksums(second) != current
    shared = learners_2.sync
    learners_2.sync = dataclasses.replace(shared, transport="gloo")  # what engines on other nodes get
    try:
        learners_2.init_weight_sync([first, second])
        stats = learners_2.sync_weights(version=7)
    finally:
        learners_2.sync = shared
    assert stats.full and _in_workers(second, _reads_shm) == [False] and stats.gather_s > 0
    assert _checksums(second) == current == _checksums(first)


def test_an_engine_dying_fails_the_sync_at_once_and_a_new_group_heals_it(
    learners_2, engines, start_engine, tiny_model_dir, make_groups
):
    first, second, _ = engines
    (doomed,) = start_engine(tiny_model_dir)
    learners_2.init_weight_sync([first, doomed, second])
    learners_2.sync_weights(version=8)
    ray.kill(doomed)
    learners_2.update(make_groups(2, seed=53))
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as failed:
        learners_2.sync_weights(version=9)
    # Settled long before the group's 600 s timeout: each member that fails tears its end down, so all fail at once.
    assert time.monotonic() - start < 60
    assert set(failed.value.engine_errors) == {0, 1, 2} and "died" in failed.value.engine_errors[1]
    assert failed.value.sender_error  # the sender saw the closed connection too

    learners_2.update(make_groups(2, seed=54))  # the learner world is still in step (it would hang otherwise)
    learners_2.init_weight_sync([first, second])
    stats = learners_2.sync_weights(version=10)
    assert stats.full and stats.version == 10
    assert _checksums(first) == _checksums(second)
    assert ray.get([e.__ray_call__.remote(lambda self: self.policy_version) for e in (first, second)]) == [10, 10]


def test_a_group_with_a_dead_engine_fails_to_form_and_the_next_one_forms(
    new_learner_group, engines, start_engine, tiny_model_dir
):
    first, second, _ = engines
    (doomed,) = start_engine(tiny_model_dir)
    ray.kill(doomed)
    learners = new_learner_group(1, sync_timeout_s=10)  # the survivors wait this long for the missing member
    try:
        with pytest.raises(WeightSyncError) as failed:
            learners.init_weight_sync([first, doomed, second])
        assert failed.value.version is None and "died" in failed.value.engine_errors[1]
        assert set(failed.value.engine_errors) == {0, 1, 2} and failed.value.sender_error  # nobody hangs
        with pytest.raises(RuntimeError, match="init_weight_sync"):
            learners.sync_weights(version=1)  # the failed group is not used

        learners.init_weight_sync([first, second])
        stats = learners.sync_weights(version=2)
        assert stats.full and _checksums(first) == _checksums(second)
    finally:
        learners.shutdown()


def test_the_first_sync_precedes_any_forward_pass_and_frozen_vision_is_sent_once(
    new_learner_group, engines, make_groups, tiny_model_dir, tmp_path
):
    """A run's first sync comes before its first step, so before any forward pass. ZeRO-3's persistent parameters
    (below param_persistence_threshold: whole on every rank once gathered) then have an empty `data`, and the learner
    must read every rank's partition from `ds_tensor` (reading `data` failed that sync: 'size of tensor a (75264)
    must match the size of tensor b (0)'). Frozen (vision) parameters go in that first sync only; the engines keep
    them."""
    first, _, reference = engines
    initial = load_file(tiny_model_dir / "model.safetensors")  # the learner's weights before its first step
    ray.get(first.load_weights.remote(initial))
    expected = _checksums(first)
    ray.get(first.load_weights.remote({name: torch.zeros_like(tensor) for name, tensor in initial.items()}))
    assert _checksums(first) != expected
    # DeepSpeed's own persistence threshold (the shared groups shard every tensor): the tiny model has persistent ones.
    frozen = new_learner_group(1, freeze_vision=True, param_persistence_threshold=None)
    try:
        frozen.init_weight_sync([first])
        full = frozen.sync_weights(version=1)
        assert full.gather_s == 0 and _checksums(first) == expected  # every partition went through shared memory
        frozen.update(make_groups(1, seed=60))
        partial = frozen.sync_weights(version=2)
        state = frozen.consolidated_state_dict()
        language = sum(v.numel() * v.element_size() for k, v in state.items() if not k.startswith("model.visual."))
        assert full.full and full.nbytes == sum(v.numel() * v.element_size() for v in state.values())
        assert not partial.full and partial.nbytes == language < full.nbytes
        path = frozen.save_checkpoint(str(tmp_path), {}, keep_last=1)
    finally:
        frozen.shutdown()
    ray.get(reference.rebuild.remote(f"{path}/{checkpoint.HF_DIR}"))
    assert _checksums(first) == _checksums(reference)


def test_a_sync_that_fails_halfway_and_is_retried_leaves_every_engine_equal_to_the_learner(
    learners_2, engines, make_groups, tmp_path
):
    first, second, reference = engines
    prompts = _prompts(make_groups)
    learners_2.init_weight_sync([first, second])
    learners_2.sync_weights(version=20)
    learners_2.update(make_groups(2, seed=55))
    _in_workers(second, _fail_second_load)
    with pytest.raises(WeightSyncError) as failed:
        learners_2.sync_weights(version=21)
    assert set(failed.value.engine_errors) == {0, 1} and "injected" in failed.value.engine_errors[1]
    assert not _segments(learners_2)  # the failed sync's shared-memory segment was unlinked
    # vLLM's layer-wise reload state was reset: every layer holds complete weights (none left on the meta device).
    assert all(len(out) > 0 for e in (first, second) for out in ray.get(e.greedy.remote(prompts)))

    learners_2.update(make_groups(2, seed=56))
    learners_2.init_weight_sync([first, second])
    assert learners_2.sync_weights(version=22).full
    assert not _segments(learners_2)
    path = learners_2.save_checkpoint(str(tmp_path), {}, keep_last=1)
    ray.get(reference.rebuild.remote(f"{path}/{checkpoint.HF_DIR}"))
    expected = _checksums(reference)
    assert _checksums(first) == expected and _checksums(second) == expected


def test_rebuilding_the_group_destroys_the_old_one(learners_2, engines):
    first, second, _ = engines
    counts = []
    for version in range(30, 34):
        learners_2.init_weight_sync([first, second])
        learners_2.sync_weights(version)
        engines_ = [_in_workers(e, _sockets) for e in (first, second)]
        counts.append([*engines_, ray.get(learners_2.learners[0].__ray_call__.remote(_sockets))])
    # A leaked group keeps its gloo connections and store sockets: the counts would grow with every rebuild.
    assert counts[3] <= counts[1], counts
