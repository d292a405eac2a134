"""The bucket plan, packing, the engines' update infos, the gate, the CPU sync group (shared memory and gloo) and the
weight-sync settings, without DeepSpeed or vLLM."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import threading
import time

import pytest
import torch

from learner.config import WeightSyncConfig
from learner.weight_sync import (
    SEGMENT_PREFIX,
    SHM_DIR,
    SyncGroup,
    SyncSender,
    bucket_from_info,
    connect,
    gate,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
    update_info,
)

MiB = 2**20


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(256, 1024, generator=g),  # 1 MiB fp32
        "b": torch.randn(1024, generator=g),
        "big": torch.randn(3 * 256, 1024, generator=g),  # 3 MiB: larger than a bucket
        "c": torch.randn(4, 4, generator=g),
        "half": torch.randn(8, generator=g).to(torch.bfloat16),
    }


def test_plan_keeps_order_respects_size_and_splits_on_dtype():
    tensors = _tensors()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 2 * MiB, version=7, full=True)
    assert [[s.name for s in b.slots] for b in plan.buckets] == [["a", "b"], ["big"], ["c"], ["half"]]
    assert [b.dtype for b in plan.buckets] == ["float32", "float32", "float32", "bfloat16"]
    assert plan.names == list(tensors) and plan.version == 7 and plan.full
    assert all(b.nbytes <= 2 * MiB for b in plan.buckets if len(b.slots) > 1)
    assert plan.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_pack_then_unpack_returns_every_tensor_exactly():
    tensors = _tensors()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 2 * MiB, version=1, full=True)
    out = {}
    for bucket in plan.buckets:
        flat = pack_bucket(bucket, tensors, torch.device("cpu"))
        assert flat.shape == (bucket.numel,) and flat.dtype == bucket.torch_dtype
        out.update(unpack_bucket(bucket, flat))
    assert list(out) == list(tensors)
    assert all(torch.equal(out[n], tensors[n]) for n in tensors)


def test_update_infos_describe_the_plan_for_either_engine():
    tensors = _tensors()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 2 * MiB, version=3, full=True)
    gloo = update_info(plan, "gloo")
    assert tuple(bucket_from_info(b) for b in gloo["buckets"]) == plan.buckets
    nccl = update_info(plan, "nccl")  # vLLM's NCCLWeightTransferUpdateInfo fields, in broadcast order
    assert nccl["names"] == plan.names
    assert nccl["dtype_names"] == ["float32"] * 4 + ["bfloat16"]
    assert nccl["shapes"] == [list(t.shape) for t in tensors.values()]


def _segments(info) -> list[str]:
    """The names of a sync group's shared-memory segments that still exist."""
    return glob.glob(f"{SHM_DIR}/{info.name}-*")


@pytest.mark.parametrize(
    ("transport", "nodes", "reads_shm"),
    [
        ("auto", (None, None), [True, True]),  # every member on the learner's node: shared memory only
        ("gloo", (None, None), [False, False]),  # a gloo broadcast to every member
        ("auto", (None, "elsewhere"), [True, False]),  # shared memory here, a gloo broadcast to the other node
    ],
)
def test_sync_group_delivers_every_bucket_per_transport_and_leaves_no_segment(transport, nodes, reads_shm):
    tensors = _tensors()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 2 * MiB, version=1, full=True)
    sender = SyncSender.serve("127.0.0.1", 3, "gloo", timeout_s=60, bucket_bytes=2 * MiB, transport=transport)
    received: dict[int, list[dict[str, torch.Tensor]]] = {1: [], 2: []}
    modes: dict[int, bool] = {}
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            store = connect(sender.info)
            gate(sender.info, rank, store)
            group = SyncGroup(sender.info, rank, store, node=nodes[rank - 1])
            modes[rank] = group.reads_shm
            for _ in range(2):  # two syncs: the second reuses the first's segment
                received[rank].append(
                    {
                        n: t.clone()
                        for bucket, flat in group.receive(plan.buckets)
                        for n, t in unpack_bucket(bucket, flat)
                    }
                )
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sender.join()
    sender.send(plan, ((bucket, tensors) for bucket in plan.buckets))
    assert not _segments(sender.info)  # unlinked once the sync ended; the members keep their mappings
    second = {n: t + 1 for n, t in tensors.items()}
    sender.send(plan, ((bucket, second) for bucket in plan.buckets))
    for t in threads:
        t.join(timeout=60)
    sender.close()
    assert not errors
    assert [modes[1], modes[2]] == reads_shm
    for rank in (1, 2):
        first_sync, second_sync = received[rank]
        assert all(torch.equal(first_sync[n], tensors[n]) for n in tensors)
        assert all(torch.equal(second_sync[n], second[n]) for n in tensors)


def test_a_member_that_fails_tears_the_group_down_and_no_segment_is_left():
    tensors = _tensors()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 2 * MiB, version=1, full=True)
    sender = SyncSender.serve("127.0.0.1", 3, "gloo", timeout_s=60, bucket_bytes=2 * MiB, transport="shm")
    created: list[bool] = []
    survivor: list[BaseException] = []

    def member(rank: int) -> None:
        store = connect(sender.info)
        gate(sender.info, rank, store)
        group = SyncGroup(sender.info, rank, store)
        try:
            for i, _ in enumerate(group.receive(plan.buckets)):
                created.append(bool(_segments(sender.info)))
                if rank == 2 and i == 1:  # loading the second bucket failed: this end leaves the group
                    group.close()
                    return
        except RuntimeError as e:  # rank 1: the failure reached it too
            survivor.append(e)

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in (1, 2)]
    for t in threads:
        t.start()
    sender.join()
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        sender.send(plan, ((bucket, tensors) for bucket in plan.buckets))
    assert time.monotonic() - start < 30  # at once, not after the group's timeout
    assert not _segments(sender.info)  # unlinked by the failed send, before any close
    for t in threads:
        t.join(timeout=60)
    sender.close()
    assert created and all(created) and len(survivor) == 1


def test_a_new_group_removes_the_segments_of_a_killed_learner():
    dead = subprocess.Popen(["true"])
    dead.wait()  # its id now names no process
    orphan, live = (
        f"{SHM_DIR}/{SEGMENT_PREFIX}{dead.pid}-0123456789ab-1",
        f"{SHM_DIR}/{SEGMENT_PREFIX}{os.getpid()}-x-1",
    )
    for path in (orphan, live):
        open(path, "wb").close()
    try:
        SyncSender.serve("127.0.0.1", 2, "gloo", timeout_s=5, bucket_bytes=MiB).close()
        assert not os.path.exists(orphan) and os.path.exists(live)
    finally:
        for path in (orphan, live):
            if os.path.exists(path):
                os.unlink(path)


def test_transport_shm_refuses_a_member_on_another_node():
    sender = SyncSender.serve("127.0.0.1", 2, "gloo", timeout_s=5, bucket_bytes=MiB, transport="shm")
    with pytest.raises(RuntimeError, match=r"weight_sync.transport=shm.*allowed values: \('auto', 'shm', 'gloo'\)"):
        SyncGroup(sender.info, 1, connect(sender.info), node="elsewhere")
    sender.close()


@pytest.mark.parametrize(
    ("config", "cuda", "message"),
    [
        (WeightSyncConfig(transport="tcp"), None, "weight_sync.transport='tcp' is not allowed: expected one of"),
        (WeightSyncConfig(backend="nccl", transport="shm"), None, "weight_sync.transport='shm' is not allowed"),
        (
            WeightSyncConfig(backend="nccl"),
            False,
            "weight_sync.backend='nccl' is not allowed: expected 'auto', 'gloo' with a cpu learner",
        ),
    ],
)
def test_weight_sync_settings_that_cannot_work_are_refused(config, cuda, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config.validate().resolved_backend(cuda) if cuda is not None else config.validate()


def test_auto_backend_follows_the_learners_device_and_a_gpu_learner_may_take_gloo():
    assert WeightSyncConfig().resolved_backend(cuda=True) == "nccl"
    assert WeightSyncConfig().resolved_backend(cuda=False) == "gloo"
    assert WeightSyncConfig(backend="gloo").resolved_backend(cuda=True) == "gloo"  # one GPU shared (gpu_smoke.sh)


def test_the_gate_names_the_missing_ranks_after_its_timeout():
    sender = SyncSender.serve("127.0.0.1", world_size=3, backend="gloo", timeout_s=1, bucket_bytes=MiB)
    member = threading.Thread(target=lambda: pytest.raises(RuntimeError, gate, sender.info, 1, connect(sender.info)))
    member.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not form in 1s, sync ranks \[2\] never arrived"):
        sender.join()
    assert time.monotonic() - start < 10
    member.join(timeout=10)
    sender.close()
