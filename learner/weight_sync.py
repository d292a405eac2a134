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
(`actors/weight_transfer.py`) and `SyncGroup` here, which hands buckets to engines on the learner's node through
shared memory and broadcasts them over gloo to the others (`weight_sync.transport`). Everything above the transport
is shared: the bucket plan (ZeRO-3 gathers one bucket at a time; NCCL's packed chunks use the same byte size), one
control call per engine per sync, the gate before a group forms, and the fault behaviour.

The gate: every member marks its arrival in rank 0's `TCPStore` and waits, up to the group's timeout, for all the
others before the transport's group is created. NCCL's `ncclCommInitRank` has no timeout, so without it a group with
a dead member would hang forever; gloo has one, but both go through the same gate so CPU tests exercise it.

This module imports neither deepspeed nor ray (and vLLM only on the NCCL path): the receiving side runs inside vLLM
worker processes and uses the same plan and unpacking code.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from learner.config import TRANSPORTS

# vLLM's packed NCCL transfer double-buffers; both ends must agree on the count.
NCCL_PACKED_BUFFERS = 2
SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "weight-sync-"  # then rank 0's process id, the group's id and the segment's generation
_SHM_ALIGN = 64  # bytes: every bucket's offset in a shared segment, so that any dtype's view is aligned


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

    @cached_property
    def layout(self) -> tuple[list[int], int]:
        """`shm_layout` of the buckets, worked out once per plan: a sync's sender, its segment and every learner
        rank that writes into it read the same layout."""
        return shm_layout(self.buckets)


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
    pack_into(bucket, tensors, flat)
    return flat


def pack_into(bucket: Bucket, tensors: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
    """Copies the bucket's tensors into `flat` (numel,), e.g. a view of a shared-memory segment."""
    for slot in bucket.slots:
        flat[slot.offset : slot.offset + slot.numel].copy_(tensors[slot.name].reshape(-1))


def shm_layout(buckets: Sequence[Bucket]) -> tuple[list[int], int]:
    """Where each bucket of a sync lies in a shared-memory segment (byte offsets) and the segment's size."""
    offsets, end = [], 0
    for bucket in buckets:
        offsets.append(end)
        end += -(-bucket.nbytes // _SHM_ALIGN) * _SHM_ALIGN
    return offsets, end


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
    transport: str = "auto"  # gloo backend: one of TRANSPORTS (see SyncGroup)
    node: str = ""  # the learner's host name: members on it read shared memory unless transport is "gloo"

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
    """One member's end of a CPU sync group: learner rank 0 (`SyncSender`) sends each sync's buckets with `send`, every
    worker of the CPU engines (`actors.weight_transfer.GlooWeightTransferEngine`) takes them with `receive`.

    Two transports under one group, chosen per member when the group forms (`SyncGroupInfo.transport`):

    - shared memory, for members on the learner's node: rank 0 packs each bucket once into a segment under /dev/shm
      that every such member maps; only a small all-reduce crosses gloo per bucket (the barrier that says the bucket
      is written and that the members have loaded the one before; it carries the segment's generation, so a member
      maps a new segment only when rank 0 made one);
    - gloo broadcast, for members on other nodes (or all of them under transport `gloo`): a group of rank 0 and those
      members only, fed from the same packed buffer.

    The segment holds a whole sync (each bucket at its own offset): vLLM's layer-wise reload keeps references to the
    tensors of layers still waiting for others, so a bucket's memory must not be rewritten before the sync ends. Rank 0
    creates it when a sync needs more room than the current one has and unlinks its name at the end of that sync
    (or when it fails): members keep their mappings for the group's life, and no name outlives a sync.

    Members create it once past the gate; creation blocks until the whole world has joined. A member whose collective
    fails tears its end down before raising, which is how a failure reaches everyone: gloo works along trees, so a
    member waiting on a relay fails only once that relay closes its connections, and members that merely time out
    would hold the learner for `timeout_s`. The group is unusable afterwards.

    Args:
        node: this member's node; None is this host's name (tests pass another to stand for a remote member).
    """

    def __init__(self, info: SyncGroupInfo, rank: int, store: dist.Store, node: str | None = None):
        self.info, self.rank = info, rank
        local = info.transport != "gloo" and (socket.gethostname() if node is None else node) == info.node
        if info.transport == "shm" and not local:
            raise RuntimeError(
                f"weight_sync.transport=shm, but sync rank {rank} is not on the learner's node {info.node!r}; "
                f"allowed values: {TRANSPORTS} (auto: shared memory on the learner's node, gloo elsewhere)"
            )
        store.set(f"shm/{rank}", "1" if local else "0")
        timeout = timedelta(seconds=info.timeout_s)
        self._gloo: dist.ProcessGroupGloo | None = dist.ProcessGroupGloo(store, rank, info.world_size, timeout)
        # Every member set its flag before joining, and joining returns once all have joined.
        readers = {r for r in range(1, info.world_size) if store.get(f"shm/{r}") == b"1"}
        self.shm, self.reads_shm = bool(readers), rank in readers
        fed = [r for r in range(info.world_size) if r not in readers]  # rank 0 and the members gloo feeds
        self._payload: dist.ProcessGroupGloo | None = None
        if not readers:
            self._payload = self._gloo
        elif len(fed) > 1 and rank in fed:
            self._payload = dist.ProcessGroupGloo(
                dist.PrefixStore("payload", store), fed.index(rank), len(fed), timeout
            )
        self._segment: torch.Tensor | None = None  # (nbytes,) uint8, mapped from /dev/shm
        self._generation = 0  # of the mapped segment
        self._linked: str | None = None  # rank 0: the path of a segment whose name still exists

    def prepare(self, plan: SyncPlan) -> tuple[str, int] | None:
        """Rank 0, before `send`: the shared segment that will carry a sync of `plan` (laid out by `plan.layout`), as
        (path, generation), so that other processes of this node can write the buckets into it themselves (see
        `map_segment`); None where no member reads shared memory. The path exists until the sync ends."""
        if not self.shm:
            return None
        self._create_segment(plan.layout[1])
        return self._segment_path(self._generation), self._generation

    def send(self, plan: SyncPlan, gathered: Iterable[tuple[Bucket, dict[str, torch.Tensor] | None]]) -> float:
        """Rank 0: packs and sends each (bucket, its tensors by name) of `gathered`, in the order of the plan's
        buckets; the tensors may be freed once the iterator moves on (they are ZeRO-3 gathers). Tensors None: the
        bucket is in the segment of `prepare` already. Returns once every member has received (shared memory: loaded)
        every bucket.

        Returns:
            Seconds spent packing.

        Raises:
            RuntimeError: a collective failed (the group is then torn down), or this group was torn down.
        """
        offsets, size = plan.layout
        pack_s = 0.0
        try:
            if self.shm:
                self._create_segment(size)
            for offset, (bucket, tensors) in zip(offsets, gathered, strict=True):
                start = time.perf_counter()
                flat = self._view(bucket, offset) if self.shm else torch.empty(bucket.numel, dtype=bucket.torch_dtype)
                if tensors is not None:
                    pack_into(bucket, tensors, flat)
                pack_s += time.perf_counter() - start
                if self._payload is not None:
                    self._broadcast(flat)
                if self.shm:
                    self._barrier()
            if self.shm:
                self._barrier()  # every member has loaded the last bucket
        finally:
            self._unlink()
        return pack_s

    def receive(self, buckets: Sequence[Bucket]) -> Iterator[tuple[Bucket, torch.Tensor]]:
        """A member: yields (bucket, its flat buffer (numel,)) for each bucket of one sync, in order; a buffer stays
        valid until the sync ends (shared memory: it is a view of the segment). Ask for the next bucket only once the
        previous one is loaded, and run the iterator to its end (its last barrier): with shared memory that is what
        tells rank 0 this member is done.

        Raises:
            RuntimeError: a collective failed (the group is then torn down), or this group was torn down.
        """
        offsets, _ = shm_layout(buckets)
        for bucket, offset in zip(buckets, offsets, strict=True):
            if self.reads_shm:
                self._attach(self._barrier())
                yield bucket, self._view(bucket, offset)
                continue
            flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype)
            self._broadcast(flat)
            if self.shm:
                self._barrier()
            yield bucket, flat
        if self.shm:
            self._barrier()

    def _broadcast(self, flat: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait(lambda: self._payload.broadcast([flat], opts))

    def _barrier(self) -> int:
        """An all-reduce of the world that carries rank 0's segment generation to everyone."""
        value = torch.tensor([self._generation if self.rank == 0 else 0], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self._wait(lambda: self._gloo.allreduce([value], opts))
        return int(value.item())

    def _wait(self, collective: Callable[[], Any]) -> None:
        if self._gloo is None:
            raise RuntimeError("weight sync: this group was torn down after a failure; join a new one")
        try:
            collective().wait()
        except RuntimeError:
            self.close()
            raise

    def _segment_path(self, generation: int) -> str:
        return f"{SHM_DIR}/{self.info.name}-{generation}"

    def _create_segment(self, size: int) -> None:
        """Rank 0: a new segment when the mapped one is smaller than `size`; its name lives until `_unlink`."""
        if self._segment is not None and self._segment.numel() >= size:
            return
        self._segment = None
        self._generation += 1
        path = self._segment_path(self._generation)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._linked = path
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self._segment = map_segment(path)

    def _attach(self, generation: int) -> None:
        """A member: maps rank 0's segment `generation` unless it already has it."""
        if generation != self._generation:
            self._segment = None
            self._segment = map_segment(self._segment_path(generation))
            self._generation = generation

    def _view(self, bucket: Bucket, offset: int) -> torch.Tensor:
        return self._segment[offset : offset + bucket.nbytes].view(bucket.torch_dtype)

    def _unlink(self) -> None:
        if self._linked is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._linked)
            self._linked = None

    def close(self) -> None:
        """Tears this end down: dropping the groups closes their connections, which is what the members waiting on
        this one notice (abort alone leaves them waiting for their timeout); the segment's name, if any, goes too."""
        self._unlink()
        self._segment = None
        for group in {id(g): g for g in (self._gloo, self._payload) if g is not None}.values():
            group.abort()
        self._gloo = self._payload = None


def _remove_orphaned_segments() -> None:
    """Unlinks the shared segments of this node whose rank 0 process is gone: a learner killed in the middle of a sync
    (SIGKILL runs no cleanup) leaves its segment's name behind. Names carry that process's id (`SyncSender.serve`)."""
    for path in glob.glob(f"{SHM_DIR}/{SEGMENT_PREFIX}*"):
        pid = path.removeprefix(f"{SHM_DIR}/{SEGMENT_PREFIX}").split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except (ValueError, PermissionError):  # not one of ours, or another user's live process
            pass


def map_segment(path: str) -> torch.Tensor:
    """A shared segment (see `SyncGroup`) as a (nbytes,) uint8 tensor whose writes every process mapping it sees."""
    return torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)


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
    def serve(
        cls, host: str, world_size: int, backend: str, timeout_s: float, bucket_bytes: int, transport: str = "auto"
    ) -> SyncSender:
        """Starts rank 0's TCPStore on a free port of `host` (and picks vLLM's NCCL rendezvous port)."""
        store = dist.TCPStore(
            host, 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        nccl_port = _free_port(host) if backend == "nccl" else 0
        _remove_orphaned_segments()
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        info = SyncGroupInfo(
            host,
            store.port,
            world_size,
            backend,
            name,
            timeout_s,
            bucket_bytes,
            nccl_port,
            transport,
            socket.gethostname(),
        )
        return cls(info, store)

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

    def prepare(self, plan: SyncPlan) -> tuple[str, int] | None:
        """The shared segment of the next sync of `plan`, if the transport has one (see `SyncGroup.prepare`)."""
        return self._gloo.prepare(plan) if self._gloo is not None else None

    def send(self, plan: SyncPlan, buckets: Iterable[tuple[Bucket, dict[str, torch.Tensor] | None]]) -> float:
        """Sends each (bucket, its gathered tensors by name, or None if written into the segment of `prepare`) of
        `plan` in order; the tensors may be freed once the iterator moves on (they are ZeRO-3 gathers).

        Returns:
            Seconds spent packing (CPU transports; NCCL packs in its producer: 0).

        Raises:
            RuntimeError: a broadcast failed (the group is then torn down, see `SyncGroup.broadcast`), or, with NCCL,
                did not complete within the group's timeout (NCCL cannot see a dead peer).
        """
        if self._gloo is not None:
            return self._gloo.send(plan, buckets)
        if self._nccl is not None:
            self._send_nccl(buckets)
            return 0.0
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
