"""The rollout side's schema: how many actors, how each one's vLLM engine is built, and how it samples.

Hydra YAML in configs/ holds overrides only; these dataclasses hold the defaults and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"rollout: key {key!r} must be {allowed}; got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout actors and their engines.

    Attributes:
        num: rollout actors (each with its own game pool and vLLM engine).
        tp: tensor-parallel GPUs per engine (1 on CPU).
        group_size: G, responses sampled per state (GRPO's group).
        states_per_round: the most states of one actor's round in sync mode (states_per_round x G samples in the
            engine at once), and an actor's states in flight when it streams on its own (`RolloutActor.stream`;
            in a training run's async mode the driver sets those from the staleness bound, launch.config.stream_slots).
        temperature: sampling temperature (1.0 keeps the sampler's log-probs those of the policy).
        top_p: nucleus sampling mass; only 1.0 (no nucleus) is accepted, as the learner does not renormalise.
        max_new_tokens: response length cap; longer responses are cut (and marked unfinished).
        seed: base seed; actor i seeds its engine with seed + i (and its game pool with the pool's seed + i).
        gpu_memory_utilization: fraction of each of its GPUs vLLM may take (GPU only; on CPU see cpu_kv_cache_gib).
            Engines own their GPUs (the learner ranks have their own), so most of the memory goes to the KV cache.
        cpu_kv_cache_gib: KV cache size on CPU, in GiB.
        enforce_eager: no CUDA graphs / compilation; None = True on CPU (a start in seconds), False on GPU (CUDA
            graphs make decoding faster).
        max_model_len: prompt + response length the engine is built for; None = the model's own limit.
        dtype: weights' dtype in the engine.
        weight_transfer: the engine's weight-transfer engine: `auto` (vLLM's NCCL engine on GPU, the project's gloo
            engine on CPU), `gloo` or `nccl`; a training run copies it from `weight_sync.backend`.
    """

    num: int = 1
    tp: int = 1
    group_size: int = 8
    states_per_round: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1
    enforce_eager: bool | None = None
    max_model_len: int | None = 4096
    dtype: str = "auto"
    weight_transfer: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first bad key and its allowed values."""
        for key in ("num", "tp", "group_size", "states_per_round", "max_new_tokens"):
            value = getattr(self, key)
            _check(_is_int(value) and value >= 1, key, "an integer >= 1", value)
        _check(_is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        transfers = ("auto", "gloo", "nccl")
        _check(self.weight_transfer in transfers, "weight_transfer", ", ".join(transfers), self.weight_transfer)
        _check(_is_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0", self.temperature)
        # vLLM reports log-probs after top-p's renormalisation, which the learner does not reproduce: its ratios and
        # importance weights would then compare two different distributions.
        _check(_is_number(self.top_p) and self.top_p == 1, "top_p", "1.0 (the learner has no top-p)", self.top_p)
        util = self.gpu_memory_utilization
        _check(_is_number(util) and 0 < util <= 1, "gpu_memory_utilization", "a number in (0, 1]", util)
        gib = self.cpu_kv_cache_gib
        _check(_is_int(gib) and gib >= 1, "cpu_kv_cache_gib", "an integer >= 1 (GiB)", gib)
        eager = self.enforce_eager
        _check(eager is None or isinstance(eager, bool), "enforce_eager", "true, false or null (auto)", eager)
        length = self.max_model_len
        ok = length is None or (_is_int(length) and length > self.max_new_tokens)
        _check(ok, "max_model_len", f"null or an integer > max_new_tokens ({self.max_new_tokens})", length)
        _check(self.dtype in DTYPES, "dtype", "one of " + ", ".join(DTYPES), self.dtype)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RolloutConfig:
        """A config from a plain mapping (e.g. a resolved Hydra node); unknown keys name the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"rollout: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
        return cls(**values)
