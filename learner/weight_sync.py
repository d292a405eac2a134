"""Weight broadcast from learner rank 0 to every vLLM worker, on vLLM's weight-transfer lifecycle.

Rank layout of the sync group (a world of its own, separate from DeepSpeed's)::

    sync rank 0           learner rank 0 (packs gathered ZeRO-3 parameters into flat buckets, broadcasts them)
    sync ranks 1..TP      engine 0's workers (TP ranks)
    sync ranks TP+1..2TP  engine 1's workers
    ...                   world size = engines x TP + 1

Learner ranks 1..W-1 are not members: they only take part in each bucket's ZeRO-3 gather.

The engines receive through vLLM's own lifecycle (`init_weight_transfer_engine(init_info)` once per group, then per
sync `start_weight_update` -> `update_weights(update_info)` -> `finish_weight_update`), with plain-dict infos that
cross process boundaries as they are. The transport is chosen from the device: on GPU vLLM's `nccl` engine and, on
this side, vLLM's trainer endpoint (`nccl_common.trainer_init`) and packed producer; on CPU the project's gloo engine
(`actors/weight_transfer.py`) and `SyncGroup` here. Everything above the transport is shared: the bucket plan (ZeRO-3
gathers one bucket at a time; NCCL's packed chunks use the same byte size), one control call per engine per sync,
the gate before a group forms, and the fault behaviour.

The gate: every member marks its arrival in rank 0's `TCPStore` and waits, up to the group's timeout, for all the
others before the transport's group is created. NCCL's `ncclCommInitRank` has no timeout, so without it a group with
a dead member would hang forever; gloo has one, but both go through the same gate so CPU tests exercise it.

This module imports neither deepspeed nor ray (and vLLM only on the NCCL path): the receiving side runs inside vLLM
worker processes and uses the same plan and unpacking code.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# vLLM's packed NCCL transfer double-buffers; both ends must agree on the count.
NCCL_PACKED_BUFFERS = 2


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


def bucket_info(bucket: Bucket) -> dict[str, Any]:
    """A bucket as the plain dict the gloo engine's `update_info` carries (see `bucket_from_info`)."""
    return {
        "dtype": bucket.dtype,
        "numel": bucket.numel,
        "names": [s.name for s in bucket.slots],
        "shapes": [list(s.shape) for s in bucket.slots],
        "offsets": [s.offset for s in bucket.slots],
    }


def bucket_from_info(info: dict[str, Any]) -> Bucket:
    slots = zip(info["names"], info["shapes"], info["offsets"], strict=True)
    return Bucket(info["dtype"], info["numel"], tuple(TensorSlot(n, tuple(s), o) for n, s, o in slots))


def update_info(plan: SyncPlan, backend: str) -> dict[str, Any]:
    """The `update_weights(update_info)` payload of one sync for an engine of `backend`: the gloo engine's buckets,
    or vLLM's NCCL engine's names, dtypes and shapes (its packed chunks are cut from these, as the sender's are)."""
    if backend == "gloo":
        return {"buckets": [bucket_info(b) for b in plan.buckets]}
    slots = [(s, b.dtype) for b in plan.buckets for s in b.slots]
    return {
        "names": [s.name for s, _ in slots],
        "dtype_names": [dtype for _, dtype in slots],
        "shapes": [list(s.shape) for s, _ in slots],
    }


@dataclass(frozen=True)
class SyncGroupInfo:
    """How members find the sync group: rank 0's TCPStore (the gate; gloo's rendezvous) and the group's identity."""

    host: str
    port: int
    world_size: int  # engines x TP + 1
    backend: str  # "gloo" or "nccl"
    name: str  # store prefix, new for every group so a re-created group never reads a stale key
    timeout_s: float
    bucket_bytes: int  # NCCL: the packed chunk size, which both ends must agree on
    nccl_port: int = 0  # NCCL: the port of vLLM's StatelessProcessGroup rendezvous on `host`

    def init_info(self, rank_offset: int) -> dict[str, Any]:
        """`init_weight_transfer_engine(init_info)` for an engine whose TP rank 0 is sync rank `rank_offset`."""
        if self.backend == "gloo":
            return {"group": asdict(self), "rank_offset": rank_offset}
        return dict(
            master_address=self.host,
            master_port=self.nccl_port,
            rank_offset=rank_offset,
            world_size=self.world_size,
            packed=True,
            packed_buffer_size_bytes=self.bucket_bytes,
            packed_num_buffers=NCCL_PACKED_BUFFERS,
        )


def connect(info: SyncGroupInfo) -> dist.Store:
    """A client of rank 0's store, prefixed with the group's name."""
    timeout = timedelta(seconds=info.timeout_s)
    store = dist.TCPStore(info.host, info.port, info.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(info.name, store)


def gate(info: SyncGroupInfo, rank: int, store: dist.Store) -> None:
    """Marks `rank` as arrived and waits until every rank has, up to the group's timeout (see the module docstring).

    Raises:
        RuntimeError: some ranks did not arrive in time (named in the message).
    """
    store.set(f"gate/{rank}", "1")
    keys = [f"gate/{r}" for r in range(info.world_size)]
    try:
        store.wait(keys, timedelta(seconds=info.timeout_s))
    except dist.DistStoreError as e:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise RuntimeError(
            f"weight sync: the group did not form in {info.timeout_s}s, sync ranks {missing} never arrived"
        ) from e


class SyncGroup:
    """One member's end of a gloo sync group: `broadcast` from sync rank 0, in place. Both ends use it: learner rank 0
    (`SyncSender`) and every worker of the CPU engines (`actors.weight_transfer.GlooWeightTransferEngine`).

    Members create it once past the gate; creation blocks until the whole world has joined.
    """

    def __init__(self, info: SyncGroupInfo, rank: int, store: dist.Store):
        self.info, self.rank = info, rank
        self._gloo: dist.ProcessGroupGloo | None = dist.ProcessGroupGloo(
            store, rank, info.world_size, timedelta(seconds=info.timeout_s)
        )

    def broadcast(self, flat: torch.Tensor) -> None:
        """Broadcasts `flat` from sync rank 0 into every member's `flat` (same numel and dtype everywhere).

        A member that fails (a peer is gone) tears its end of the group down before raising, which is how the failure
        reaches everyone: gloo broadcasts along a tree, so a member waiting on a relay fails only once that relay
        closes its connections, and members that merely time out would hold the learner for `timeout_s`. The group
        is unusable afterwards.

        Raises:
            RuntimeError: the broadcast failed, or this group was torn down.
        """
        if self._gloo is None:
            raise RuntimeError("weight sync: this group was torn down after a failure; join a new one")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            self._gloo.broadcast([flat], opts).wait()
        except RuntimeError:
            self.close()
            raise

    def close(self) -> None:
        """Tears this end down: dropping the group closes its connections, which is what the members waiting on this
        one notice (abort alone leaves them waiting for their timeout)."""
        if self._gloo is not None:
            self._gloo.abort()
            self._gloo = None


class SyncSender:
    """Learner rank 0's end of a sync group.

    `serve` opens rank 0's store and returns the sender; its `info` goes to the engines, which join while rank 0
    calls `join` (all concurrently); `send` then broadcasts one sync's buckets. `close` destroys the group and the
    store, as a rebuild must (a new group gets a new sender).
    """

    def __init__(self, info: SyncGroupInfo, store: dist.TCPStore):
        self.info, self._store = info, store
        self._gloo: SyncGroup | None = None
        self._nccl: Any = None  # vLLM's PyNcclCommunicator

    @classmethod
    def serve(cls, host: str, world_size: int, backend: str, timeout_s: float, bucket_bytes: int) -> SyncSender:
        """Starts rank 0's TCPStore on a free port of `host` (and picks vLLM's NCCL rendezvous port)."""
        store = dist.TCPStore(
            host, 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        nccl_port = _free_port(host) if backend == "nccl" else 0
        name = f"weight-sync-{uuid.uuid4().hex[:12]}"
        return cls(
            SyncGroupInfo(host, store.port, world_size, backend, name, timeout_s, bucket_bytes, nccl_port), store
        )

    def join(self) -> None:
        """Passes the gate as sync rank 0 and opens the transport; blocks until every engine worker joined."""
        prefixed = dist.PrefixStore(self.info.name, self._store)
        gate(self.info, 0, prefixed)
        if self.info.backend == "gloo":
            self._gloo = SyncGroup(self.info, 0, prefixed)
            return
        # vLLM's trainer-side endpoint of its NCCL engine. Imported here: CPU learners never need vLLM's CUDA pieces.
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        rendezvous = {"master_address": self.info.host, "master_port": self.info.nccl_port}
        self._nccl = trainer_init(dict(rendezvous, world_size=self.info.world_size))

    def send(self, buckets: Iterable[tuple[Bucket, dict[str, torch.Tensor]]]) -> None:
        """Broadcasts each (bucket, its gathered tensors by name) in order; the tensors may be freed once the
        iterator moves on (they are ZeRO-3 gathers).

        Raises:
            RuntimeError: a broadcast failed (the group is then torn down, see `SyncGroup.broadcast`), or, with NCCL,
                did not complete within the group's timeout (NCCL cannot see a dead peer).
        """
        if self._gloo is not None:
            for bucket, tensors in buckets:
                self._gloo.broadcast(pack_bucket(bucket, tensors, torch.device("cpu")))
        elif self._nccl is not None:
            self._send_nccl(buckets)
        else:
            raise RuntimeError("weight sync: this group was torn down after a failure; join a new one")

    def _send_nccl(self, buckets: Iterable[tuple[Bucket, dict[str, torch.Tensor]]]) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        # Copies: the producer packs tensors of several buckets into one chunk, after their gathers were released.
        pairs = ((s.name, tensors[s.name].detach().clone()) for bucket, tensors in buckets for s in bucket.slots)
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                packed_nccl_broadcast_producer(
                    iterator=pairs,
                    group=self._nccl,
                    src=0,
                    post_iter_func=lambda item: item[1],
                    buffer_size_bytes=self.info.bucket_bytes,
                    num_buffers=NCCL_PACKED_BUFFERS,
                )
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)

        # In a thread: a broadcast whose peer died never completes, and a learner blocked in it would never train
        # again. Aborting the communicator (vLLM's destroy) fails the stuck stream, and the thread ends.
        thread = threading.Thread(target=produce, name="weight-sync-nccl", daemon=True)
        thread.start()
        thread.join(self.info.timeout_s)
        if thread.is_alive():
            self.close()
            thread.join(self.info.timeout_s)
            raise RuntimeError(f"weight sync: a broadcast did not complete in {self.info.timeout_s}s")
        if failure:
            self.close()
            raise RuntimeError(f"weight sync: {type(failure[0]).__name__}: {failure[0]}") from failure[0]

    def close(self) -> None:
        """Destroys this end of the group (NCCL: vLLM's ncclCommAbort, bounded) and stops serving the store."""
        if self._gloo is not None:
            self._gloo.close()
            self._gloo = None
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None
        self._store = None  # the last reference: its server socket closes


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
