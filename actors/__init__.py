"""The generation half: rollout actors that each hold a game pool and a vLLM engine, and the models they serve.

Names load lazily (PEP 562): the learner imports `actors.vocab` for the sampling mask and must not pull in vLLM, the
games or the engine wrapper with it. Nothing here imports deepspeed.
"""

import importlib

_EXPORTS = {
    "RolloutConfig": "actors.config",
    "MODEL_NAMES": "actors.models",
    "ModelSource": "actors.models",
    "resolve_model": "actors.models",
    "RolloutActor": "actors.rollout_actor",
    "RoundResult": "actors.rollout_actor",
    "RoundStats": "actors.rollout_actor",
    "build_tiny_model": "actors.tiny_model",
    "ensure_tiny_model": "actors.tiny_model",
    "VLLMEngine": "actors.vllm_engine",
    "WeightSyncExtension": "actors.vllm_worker_ext",
    "allowed_token_ids": "actors.vocab",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
