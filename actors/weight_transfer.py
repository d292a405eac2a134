"""The CPU transport of the weight broadcast as a vLLM weight-transfer engine, and the reset of a failed update.

vLLM drives weight updates through a `WeightTransferEngine` it builds in each worker from the engine's
`weight_transfer_config` (`init_weight_transfer_engine(init_info)`, then per update `start_weight_update` ->
`update_weights(update_info)` -> `finish_weight_update`). On GPU the engines use vLLM's own `nccl` engine; on CPU,
where NCCL does not exist, this module's `GlooWeightTransferEngine` takes its place under the name `gloo`, with the
same lifecycle and the same layer-wise reload, so the code above the transport is the same on both.

Registration happens when this module is imported. vLLM imports `actors.vllm_worker_ext` (the engine's
`worker_extension_cls`, which imports this module) in every worker process before the worker loads its model and
builds its transfer engine, whatever the executor (in-process, multiprocessing, Ray) and whether the engine core runs
in the caller's process or its own. A vLLM general plugin would do the same through a packaging entry point, which an
uninstalled checkout or a stale install silently lacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import layerwise
from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload, initialize_layerwise_reload

# The sync group and the plan format are shared with the sender; learner.weight_sync imports neither deepspeed nor ray.
from learner.weight_sync import SyncGroup, SyncGroupInfo, bucket_from_info, connect, unpack_bucket

BACKEND = "gloo"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """`init_info` of the gloo engine (`learner.weight_sync.SyncGroupInfo.init_info`)."""

    group: dict[str, Any]  # a SyncGroupInfo's fields
    rank_offset: int  # sync rank of this engine's TP rank 0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """`update_info` of one sync (`learner.weight_sync.update_info`): its buckets in broadcast order."""

    buckets: list[dict[str, Any]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives the learner's buckets (shared memory on the learner's node, a gloo broadcast elsewhere; see
    `learner.weight_sync.SyncGroup`) and loads them through vLLM's layer-wise reload.

    Weights are loaded bucket after bucket with the model's `load_weights` between vLLM's
    `initialize_layerwise_reload` and `finalize_layerwise_reload` (as its NCCL engine does): each layer is processed
    (on CPU: repacked into kernel layouts) as soon as its last tensor arrives, so at most one bucket plus the layers
    still waiting for a tensor are in memory.
    """

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: SyncGroup | None = None
        self.timings = {"receive_s": 0.0, "load_s": 0.0, "finish_s": 0.0}  # of the last update (bench/weight_sync.py)

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Joins the group as sync rank `rank_offset + <TP rank>`, replacing (and destroying) any previous group.

        The caller has passed the gate (`actors.vllm_worker_ext.WeightSyncExtension.pass_weight_sync_gate`); this
        blocks until every member has joined, up to the group's timeout.
        """
        self.shutdown()
        info = SyncGroupInfo(**init_info.group)
        self.group = SyncGroup(info, init_info.rank_offset + self.parallel_config.rank, connect(info))

    def start_weight_update(self) -> None:
        self.timings = dict.fromkeys(self.timings, 0.0)
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        start = time.perf_counter()
        finalize_layerwise_reload(self.model, self.model_config)
        self.timings["finish_s"] = time.perf_counter() - start

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """vLLM's `update_weights` without its device synchronize, which raises where there is no accelerator."""
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Receives every bucket of one sync and loads it. A failure, in the broadcast or in loading, tears this end
        of the group down before raising, so the sender and the other engines fail at once instead of waiting for a
        member that left."""
        if self.group is None:
            raise RuntimeError("weight sync: init_weight_transfer_engine was not called (or the group was torn down)")
        buckets = [bucket_from_info(info) for info in update_info.buckets]
        try:
            t0 = time.perf_counter()
            for bucket, flat in self.group.receive(buckets):  # flat: a view of shared memory or a gloo broadcast
                t1 = time.perf_counter()
                self.model.load_weights(unpack_bucket(bucket, flat))
                self.timings["receive_s"] += t1 - t0
                t0 = time.perf_counter()
                self.timings["load_s"] += t0 - t1
            self.timings["receive_s"] += time.perf_counter() - t0
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def abort_layerwise_reload(model: torch.nn.Module) -> None:
    """Undoes an unfinished `initialize_layerwise_reload`: every layer still waiting for tensors gets its last
    complete weights back and forgets what it buffered.

    A broadcast that fails halfway leaves layers on the meta device with buffered tensors of the failed sync. vLLM's
    `finalize_layerwise_reload` would process those with uninitialised memory for the tensors that never came, and a
    new `initialize_layerwise_reload` skips layers already initialised, so a retry would complete them early from the
    stale buffer and drop its own tensors as excess. Layers processed before the failure keep the new weights: the
    model then mixes two versions, until the retry (a full sync) overwrites every tensor.
    """
    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:
            layerwise._place_kernel_tensors(layer, info)
        info.reset()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    layerwise.LOADING_LAYERS.clear()


WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
