"""The receiving end of weight updates, running inside each vLLM worker process.

vLLM mixes this class into its worker class (`LLM(worker_extension_cls="actors.vllm_worker_ext.WeightSyncExtension")`),
so `llm.collective_rpc("<method>", ...)` runs the method on every worker (every tensor-parallel rank), with `self` the
worker: `self.model_runner`, `self.reload_weights`, `self.device` are vLLM's. Method names must not clash with the
worker's own attributes (vLLM asserts that at start-up).

Weights are loaded through vLLM's in-place reload (`Worker.reload_weights`), not the model's `load_weights`: the CPU
backend repacks weights into kernel layouts after loading, which a direct `load_weights` call would bypass. Each call
should carry whole layers (all tensors of a module), as the checkpoint loader would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator

import torch

# The sync group and the plan format are shared with the sender; learner.weight_sync imports neither deepspeed nor ray.
from learner.weight_sync import SyncGroup, SyncGroupInfo, SyncPlan, unpack_bucket


class WeightSyncExtension:
    """Worker-side weight loading; `actors.vllm_engine.VLLMEngine` calls it through `collective_rpc`."""

    def load_policy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads checkpoint-named tensors (as in the model's safetensors) into this worker's model in place.

        Args:
            weights: (name, tensor) pairs; tensors on any device, in any float dtype (cast on copy).

        Returns:
            The number of tensors received.
        """
        received = list(weights)
        self.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)
        return len(received)

    def join_weight_sync(self, info: SyncGroupInfo, rank_offset: int) -> None:
        """Joins the weight-sync group as rank `rank_offset + <this worker's rank>` (TP rank 0 at `rank_offset`).

        Blocks until every member (learner rank 0 and all engines' workers) has joined; joining again (a re-created
        group after an engine restart) replaces the old membership.
        """
        self._weight_sync_group = SyncGroup.join(info, rank_offset + self.rank, self.device)

    def receive_weights(self, plan: SyncPlan) -> float:
        """Receives one sync's buckets from learner rank 0 and loads them in place, bucket after bucket.

        The generator receives a bucket only when vLLM's loader asks for its first tensor, so at most one bucket
        (plus the layers still waiting for their last tensor) is in memory. vLLM's reload also resets this worker's
        encoder and multimodal caches; the engine resets the prefix cache (a scheduler-side structure).

        Returns:
            Seconds spent receiving and loading.
        """
        start = time.perf_counter()

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in plan.buckets:
                flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=self.device)  # (numel,)
                self._weight_sync_group.broadcast(flat)
                yield from unpack_bucket(bucket, flat)

        weights = stream()
        try:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        finally:
            # Every bucket must be received even if the loader stopped early or failed, or the sender's broadcast
            # never completes; a failure is raised once the stream is drained.
            for _ in weights:
                pass
        return time.perf_counter() - start

    def weight_checksums(self) -> dict[str, str]:
        """SHA-256 of every parameter and buffer of this worker's model, by vLLM name (in vLLM's own layout).

        Two engines hold the same weights exactly when their checksums are equal, whatever the loading path.
        """
        model = self.model_runner.get_model()
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return {
            name: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for name, t in tensors
        }
