"""The bucket plan, packing, the engines' update infos, the gate and the gloo sync group, without DeepSpeed or vLLM."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from learner.weight_sync import (
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


def test_gloo_sync_group_broadcasts_buckets_from_rank_0():
    tensors = _tensors()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 2 * MiB, version=1, full=True)
    sender = SyncSender.serve("127.0.0.1", world_size=3, backend="gloo", timeout_s=60, bucket_bytes=2 * MiB)
    received: dict[int, dict[str, torch.Tensor]] = {1: {}, 2: {}}
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            store = connect(sender.info)
            gate(sender.info, rank, store)
            group = SyncGroup(sender.info, rank, store)
            for bucket in plan.buckets:
                flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype)
                group.broadcast(flat)
                received[rank].update((n, t.clone()) for n, t in unpack_bucket(bucket, flat))
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sender.join()
    sender.send((bucket, tensors) for bucket in plan.buckets)
    for t in threads:
        t.join(timeout=60)
    sender.close()
    assert not errors
    for rank in (1, 2):
        assert all(torch.equal(received[rank][n], tensors[n]) for n in tensors)


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
