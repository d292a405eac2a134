"""The training half: GRPO math, the DeepSpeed ZeRO-3 learner group, weight broadcast to vLLM, checkpoints.

`Learner` and `LearnerGroup` load lazily (PEP 562): vLLM worker processes import `learner.weight_sync` for the sync
protocol and must not pull in deepspeed or a learner's model code with it.
"""

import importlib

from learner.config import CheckpointConfig, GRPOConfig, LearnerConfig, WeightSyncConfig
from learner.weight_sync import SyncGroupInfo, SyncPlan

_LAZY = {
    "Learner": "learner.grpo_learner",
    "LearnerDiedError": "learner.learner_group",
    "LearnerGroup": "learner.learner_group",
    "SyncStats": "learner.learner_group",
    "WeightSyncError": "learner.learner_group",
}

__all__ = [
    "CheckpointConfig",
    "GRPOConfig",
    "Learner",
    "LearnerConfig",
    "LearnerDiedError",
    "LearnerGroup",
    "SyncGroupInfo",
    "SyncPlan",
    "SyncStats",
    "WeightSyncConfig",
    "WeightSyncError",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
