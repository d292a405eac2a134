"""Weight broadcast from learner rank 0 to every vLLM worker: the sync group, the bucket plan, pack and unpack.

Rank layout of the sync group (a torch.distributed world of its own, separate from DeepSpeed's)::

    sync rank 0           learner rank 0 (packs gathered ZeRO-3 parameters into flat buckets, broadcasts them)
    sync ranks 1..TP      engine 0's workers (TP ranks)
    sync ranks TP+1..2TP  engine 1's workers
    ...                   world size = engines x TP + 1

Learner ranks 1..W-1 are not members: they only take part in each bucket's ZeRO-3 gather.

A sync is one `SyncPlan` (names, shapes, dtype and offset of every tensor in every bucket) sent to each engine by ONE
control call, followed by one broadcast per bucket; peers that sent one remote call per parameter timed out at 200+
calls while the broadcasts themselves took 0.5 s. On CPU the transport is a `ProcessGroupGloo` over a `TCPStore`; on
GPU it is vLLM's documented RLHF way: a `StatelessProcessGroup` (metadata) and a `PyNcclCommunicator` (data).

This module imports neither deepspeed nor ray: the receiving side (`actors/vllm_worker_ext.py`) runs inside vLLM
worker processes and uses the same plan and unpacking code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lies in its bucket's flat buffer."""

    name: str  # Hugging Face parameter name, e.g. "model.language_model.layers.0.mlp.up_proj.weight"
    shape: tuple[int, ...]
    offset: int  # first element in the bucket's flat buffer

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of a single dtype, broadcast in one collective."""

    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    numel: int  # (numel,) elements of the flat buffer
    slots: tuple[TensorSlot, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class SyncPlan:
    """Everything a receiver needs for one sync: the buckets in broadcast order and the version they carry."""

    version: int  # policy version the engines take once loaded
    buckets: tuple[Bucket, ...]
    full: bool  # True when frozen parameters are included (the first sync of a group)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def names(self) -> list[str]:
        return [s.name for b in self.buckets for s in b.slots]


def plan_buckets(
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int, version: int, full: bool
) -> SyncPlan:
    """Packs tensors, in the given order, into buckets of at most `bucket_bytes` (one dtype per bucket).

    Order is kept so that a receiver loads layer after layer (vLLM then buffers at most one layer at a time); a dtype
    change or a full bucket starts the next one, and a tensor larger than a bucket travels alone.

    Args:
        tensors: (name, full shape, dtype) per tensor, in model order.
        bucket_bytes: largest flat buffer, in bytes.
        version: policy version the plan carries.
        full: whether frozen parameters are part of this plan.
    """
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    dtype: torch.dtype | None = None
    numel = 0

    def close() -> None:
        if slots:
            buckets.append(Bucket(str(dtype).removeprefix("torch."), numel, tuple(slots)))

    for name, shape, tdtype in tensors:
        size = TensorSlot(name, tuple(shape), 0).numel
        if slots and (tdtype != dtype or (numel + size) * tdtype.itemsize > bucket_bytes):
            close()
            slots, numel = [], 0
        dtype = tdtype
        slots.append(TensorSlot(name, tuple(shape), numel))
        numel += size
    close()
    return SyncPlan(version=version, buckets=tuple(buckets), full=full)


def pack_bucket(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Copies the bucket's tensors into one new flat buffer (numel,) on `device`."""
    flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=device)
    for slot in bucket.slots:
        flat[slot.offset : slot.offset + slot.numel].copy_(tensors[slot.name].reshape(-1))
    return flat


def unpack_bucket(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, view) for each tensor of a received flat buffer; views share the buffer's memory."""
    for slot in bucket.slots:
        yield slot.name, flat[slot.offset : slot.offset + slot.numel].view(slot.shape)


@dataclass(frozen=True)
class SyncGroupInfo:
    """How members find the sync group: rank 0's TCPStore address and the group's identity."""

    host: str
    port: int
    world_size: int  # engines x TP + 1
    backend: str  # "gloo" or "nccl"
    name: str  # store prefix, new for every group so a re-created group never reads a stale key
    timeout_s: float


class SyncGroup:
    """One member's end of the sync group: `broadcast` from sync rank 0, in place.

    Rank 0 creates the TCPStore server first (`SyncGroup.serve`), hands the `SyncGroupInfo` to the others, then every
    member, rank 0 included, calls `join`; joining blocks until the whole world has joined, so the caller must start
    all members concurrently.
    """

    def __init__(self, info: SyncGroupInfo, rank: int, store: dist.Store, device: torch.device):
        self.info, self.rank, self.device = info, rank, device
        prefixed = dist.PrefixStore(info.name, store)
        timeout = timedelta(seconds=info.timeout_s)
        if info.backend == "gloo":
            self._gloo = dist.ProcessGroupGloo(prefixed, rank, info.world_size, timeout)
            self._nccl = None
        else:
            # vLLM's RLHF recipe: a stateless group for metadata, PyNccl for data. Imported only here so that the
            # learner imports vLLM nowhere else and CPU learners never need its CUDA pieces.
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            meta = StatelessProcessGroup(rank=rank, world_size=info.world_size, store=prefixed)
            self._nccl = PyNcclCommunicator(meta, device=device)
            if self._nccl.disabled or not self._nccl.available:  # it would turn every broadcast into a no-op
                raise RuntimeError("weight sync: vLLM's PyNccl is unavailable here (NCCL library, VLLM_DISABLE_PYNCCL)")
            self._gloo = None

    @staticmethod
    def serve(host: str, world_size: int, backend: str, timeout_s: float) -> tuple[SyncGroupInfo, dist.Store]:
        """Starts rank 0's TCPStore on a free port of `host`; returns the info members need and the store."""
        store = dist.TCPStore(
            host, 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        name = f"weight-sync-{uuid.uuid4().hex[:12]}"
        return SyncGroupInfo(host, store.port, world_size, backend, name, timeout_s), store

    @classmethod
    def join(cls, info: SyncGroupInfo, rank: int, device: torch.device, store: dist.Store | None = None) -> SyncGroup:
        """Joins as `rank` (rank 0 passes the store from `serve`); blocks until all `world_size` members joined."""
        if store is None:
            store = dist.TCPStore(
                info.host, info.port, info.world_size, is_master=False, timeout=timedelta(seconds=info.timeout_s)
            )
        return cls(info, rank, store, device)

    def broadcast(self, flat: torch.Tensor) -> None:
        """Broadcasts `flat` from sync rank 0 into every member's `flat` (same numel and dtype everywhere).

        A member that fails (a peer is gone) tears its end of the group down before raising, which is how the failure
        reaches everyone: gloo broadcasts along a tree, so a member waiting on a relay fails only once that relay
        closes its connections, and members that merely time out would hold the learner for `timeout_s`. NCCL cannot
        see a dead peer, so there the wait is bounded by the group's timeout. The group is unusable afterwards.

        Raises:
            RuntimeError: the broadcast failed, or this group was torn down by an earlier failure.
        """
        if self._gloo is None and self._nccl is None:
            raise RuntimeError("weight sync: this group was torn down after a failed broadcast; join a new one")
        try:
            self._broadcast(flat)
        except RuntimeError:
            self._tear_down()
            raise

    def _broadcast(self, flat: torch.Tensor) -> None:
        if self._gloo is not None:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self._gloo.broadcast([flat], opts).wait()
        else:
            self._nccl.broadcast(flat, src=0, stream=torch.cuda.current_stream())
            # The receiver hands views of `flat` to vLLM's loaders on the same stream; the sender reuses memory
            # right after, so wait here rather than reason about stream lifetimes. Polled, not synchronize():
            # a broadcast whose peer died never completes, and a learner blocked in it would never train again.
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream())
            deadline = time.monotonic() + self.info.timeout_s
            while not done.query():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weight sync: a broadcast did not complete in {self.info.timeout_s}s")
                time.sleep(0.001)

    def _tear_down(self) -> None:
        if self._gloo is not None:
            self._gloo.abort()
            # Dropping the group closes its connections, which is what the members waiting on this one notice;
            # abort alone leaves them waiting for their timeout.
            self._gloo = None
        elif self._nccl is not None:
            self._nccl.destroy()  # vLLM's ncclCommAbort, in a thread with a timeout
            self._nccl = None
