"""Project methods inside each vLLM worker process, next to vLLM's own weight-transfer lifecycle.

vLLM mixes this class into its worker class (`worker_extension_cls="actors.vllm_worker_ext.WeightSyncExtension"`), so
`collective_rpc("<method>", ...)` runs the method on every worker (every tensor-parallel rank), with `self` the
worker: `self.model_runner`, `self.reload_weights`, `self.weight_transfer_engine` are vLLM's. Method names must not
clash with the worker's own attributes (vLLM asserts that at start-up).

Broadcast weights arrive through vLLM's own worker methods (`init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`); this class adds what they lack: the gate before a group forms and the reset
of a failed update. Importing it registers the CPU transfer engine (see `actors/weight_transfer.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from actors.weight_transfer import abort_layerwise_reload
from learner.weight_sync import SyncGroupInfo, connect, gate


class WeightSyncExtension:
    """Worker-side weight loading; `actors.vllm_engine.VLLMEngine` calls it through `collective_rpc`."""

    def load_policy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads checkpoint-named tensors (as in the model's safetensors) into this worker's model in place.

        Weights go through vLLM's in-place reload (`Worker.reload_weights`), not the model's `load_weights` alone:
        the CPU backend repacks weights into kernel layouts after loading, which a direct call would bypass.

        Args:
            weights: (name, tensor) pairs; tensors on any device, in any float dtype (cast on copy).

        Returns:
            The number of tensors received.
        """
        received = list(weights)
        self.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)
        return len(received)

    def pass_weight_sync_gate(self, group: dict[str, Any], rank_offset: int) -> None:
        """Waits, as sync rank `rank_offset + <TP rank>`, until every member of the group has arrived (see
        `learner.weight_sync.gate`); call before `init_weight_transfer_engine`, whose group creation may not time out.

        Raises:
            RuntimeError: members missing after the group's timeout.
        """
        info = SyncGroupInfo(**group)
        gate(info, rank_offset + self.rank, connect(info))

    def abort_weight_update(self) -> None:
        """Resets a weight update that failed: vLLM's layer-wise reload state (see
        `actors.weight_transfer.abort_layerwise_reload`), the worker's update flag, and the transfer group, which is
        unusable after a failed collective (a new group must form before the next update)."""
        abort_layerwise_reload(self.weight_transfer_engine.model)
        self._weight_update_active = False
        self.weight_transfer_engine.shutdown()

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
