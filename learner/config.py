"""The learner's schema: GRPO loss settings, the DeepSpeed learner, weight sync and checkpoints.

These dataclasses are the single source of defaults; Hydra YAML under `configs/` only overrides them. Each has a
`validate()` that raises ValueError naming the key and what is allowed, so a typo in an override fails at start-up,
not an hour into a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Aggregation modes, KL estimators and objectives implemented by learner.grpo (kept here so that configs fail before
# any import of it).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
OBJECTIVES = ("ppo", "decoupled")
# `weight_sync.transport` of the gloo backend (learner.weight_sync.SyncGroup): shared memory on the learner's node.
TRANSPORTS = ("auto", "shm", "gloo")
DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
DEEPSPEED_PRESETS = {"cpu": "zero3_cpu_fp32.json", "gpu": "zero3_gpu_bf16.json"}


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: expected {allowed}")


@dataclass(frozen=True)
class GRPOConfig:
    """The GRPO-family loss. Defaults follow the G1 paper (token-mean, clip 0.2, 1 PPO epoch)."""

    clip_low: float = 0.2
    """PPO lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """PPO upper clip: ratio <= 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages (verl uses 3.0); None switches it off."""
    loss_agg: str = "token-mean"
    """How token losses become one number: one of LOSS_AGGREGATIONS (Dr.GRPO: seq-mean-token-sum-norm)."""
    normalize_std: bool = True
    """Divide group-centred rewards by the group std (GRPO); False gives Dr.GRPO's unscaled advantages."""
    unbiased_std: bool = True
    """The group std is the unbiased one (ddof 1, torch.std, as EasyR1 and verl); False: the population std."""
    adv_eps: float = 1e-6
    """Added to the group std before dividing."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference loss term (the paper: 1e-2); 0 builds no reference model."""
    kl_estimator: str = "k3"
    """KL estimator: one of KL_ESTIMATORS."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    is_cap: float | None = 2.0
    """Cap of the importance weight old/sampler of tokens sampled by other weights (see objective); None: no
    correction under 'ppo', the weights as they are under 'decoupled'."""
    objective: str = "ppo"
    """One of OBJECTIVES: what a weight above is_cap does: 'ppo' truncates it (verl's TIS), 'decoupled' drops the
    token (AReaL's decoupled PPO); both clip the ratio current/old, old being the learner's weights (learner.grpo)."""
    ppo_epochs: int = 1
    """Passes over each update's batch."""
    num_minibatches: int = 1
    """Optimizer steps per pass: the batch is cut into this many minibatches (the paper: 5 per rollout step)."""

    def validate(self) -> GRPOConfig:
        _require(0.0 <= self.clip_low < 1.0, "grpo.clip_low", "a number in [0, 1)", self.clip_low)
        _require(self.clip_high >= 0.0, "grpo.clip_high", "a number >= 0", self.clip_high)
        _require(self.dual_clip is None or self.dual_clip > 1.0, "grpo.dual_clip", "None or > 1", self.dual_clip)
        _require(self.loss_agg in LOSS_AGGREGATIONS, "grpo.loss_agg", f"one of {LOSS_AGGREGATIONS}", self.loss_agg)
        _require(self.adv_eps > 0.0, "grpo.adv_eps", "a number > 0", self.adv_eps)
        _require(self.kl_coef >= 0.0, "grpo.kl_coef", "a number >= 0", self.kl_coef)
        _require(self.kl_estimator in KL_ESTIMATORS, "grpo.kl_estimator", f"one of {KL_ESTIMATORS}", self.kl_estimator)
        _require(self.entropy_coef >= 0.0, "grpo.entropy_coef", "a number >= 0", self.entropy_coef)
        _require(self.is_cap is None or self.is_cap >= 1.0, "grpo.is_cap", "None or a number >= 1", self.is_cap)
        _require(self.objective in OBJECTIVES, "grpo.objective", f"one of {OBJECTIVES}", self.objective)
        _require(self.ppo_epochs >= 1, "grpo.ppo_epochs", "an integer >= 1", self.ppo_epochs)
        _require(self.num_minibatches >= 1, "grpo.num_minibatches", "an integer >= 1", self.num_minibatches)
        return self


@dataclass(frozen=True)
class LearnerConfig:
    """One DeepSpeed ZeRO-3 learner rank and the group of them."""

    model_dir: str = ""
    """Hugging Face directory of the policy (weights, config, tokenizer and processor files)."""
    num: int = 1
    """Ranks of the learner group (one per GPU; CPU tests use 2)."""
    deepspeed_config: str = "auto"
    """A DeepSpeed JSON file, a preset name ('cpu': fp32, 'gpu': bf16) or 'auto' (gpu when CUDA is visible)."""
    lr: float = 1e-6
    """AdamW learning rate (the paper: 1e-6; the tiny model learns at 3e-4..1e-3)."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up from 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; a minibatch is accumulated over as many micro-batches as it needs."""
    micro_batch_tokens: int | None = None
    """Packs micro-batches by size instead: consecutive sequences while (sequences x the longest, padding included)
    stays within this many tokens, a longer sequence alone (verl's dynamic batch size). Fewer, fuller forwards where
    sequences are short (ZeRO-3's per-module cost is paid once per forward), no out-of-memory where they are long.
    Every rank runs as many micro-batches as the rank that needs the most. None: `micro_batch_size` sequences each."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more compute)."""
    freeze_vision: bool = False
    """Keep the vision tower fixed (the paper trains it); frozen weights are then broadcast to engines only once."""
    param_offload: bool = False
    """ZeRO-3 parameter offload to CPU memory (GPU only)."""
    optimizer_offload: bool = False
    """ZeRO-3 optimizer-state offload to CPU memory (GPU only: it needs DeepSpeed's CPUAdam build)."""
    param_persistence_threshold: int | None = None
    """Override of stage3_param_persistence_threshold: tensors smaller than this stay whole on every rank.
    Tests set 0 so that a tiny model is really sharded; None keeps the DeepSpeed file's value."""
    max_response_len: int | None = None
    """The Dr.GRPO normaliser (seq-mean-token-sum-norm divides each response's token sum by this constant); the
    trainer sets it to actors.max_new_tokens. None: the batch's longest response."""
    temperature: float = 1.0
    """The actors' sampling temperature (the trainer copies actors.temperature): the learner divides its logits by it,
    so its log-probs are those of the distribution vLLM sampled from (vLLM's processed log-probs)."""
    seed: int = 0
    """Seeds torch, numpy and random on every rank (the same on all ranks: ranks see different data)."""

    def validate(self) -> LearnerConfig:
        _require(bool(self.model_dir), "learner.model_dir", "a model directory", self.model_dir)
        _require(self.num >= 1, "learner.num", "an integer >= 1", self.num)
        ds = self.deepspeed_config
        known = ds == "auto" or ds in DEEPSPEED_PRESETS or ds.endswith(".json")
        _require(known, "learner.deepspeed_config", f"'auto', one of {tuple(DEEPSPEED_PRESETS)} or a .json path", ds)
        _require(self.lr > 0.0, "learner.lr", "a number > 0", self.lr)
        _require(self.weight_decay >= 0.0, "learner.weight_decay", "a number >= 0", self.weight_decay)
        betas_ok = len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)
        _require(betas_ok, "learner.betas", "two numbers in [0, 1)", self.betas)
        _require(self.warmup_steps >= 0, "learner.warmup_steps", "an integer >= 0", self.warmup_steps)
        _require(self.grad_clip >= 0.0, "learner.grad_clip", "a number >= 0", self.grad_clip)
        _require(self.temperature > 0.0, "learner.temperature", "a number > 0", self.temperature)
        _require(self.micro_batch_size >= 1, "learner.micro_batch_size", "an integer >= 1", self.micro_batch_size)
        tokens = self.micro_batch_tokens
        _require(tokens is None or tokens >= 1, "learner.micro_batch_tokens", "None or an integer >= 1", tokens)
        cap = self.max_response_len
        _require(cap is None or cap >= 1, "learner.max_response_len", "None or an integer >= 1", cap)
        threshold = self.param_persistence_threshold
        ok = threshold is None or threshold >= 0
        _require(ok, "learner.param_persistence_threshold", "None or an integer >= 0", threshold)
        return self

    def deepspeed_config_path(self, cuda: bool) -> Path:
        """The DeepSpeed JSON to use: the preset for this hardware under 'auto', else the named preset or file."""
        name = ("gpu" if cuda else "cpu") if self.deepspeed_config == "auto" else self.deepspeed_config
        return DEEPSPEED_CONFIG_DIR / DEEPSPEED_PRESETS[name] if name in DEEPSPEED_PRESETS else Path(name)


@dataclass(frozen=True)
class WeightSyncConfig:
    """The broadcast of learner weights to every vLLM worker."""

    bucket_mb: int = 512
    """Size of one flat broadcast buffer in MiB: tensors are packed into buckets of at most this size (a tensor
    larger than a bucket travels alone)."""
    every_steps: int = 1
    """Learner updates between two syncs (sync mode: 1)."""
    backend: str = "auto"
    """Transport: 'gloo' (CPU: the project's engine, actors/weight_transfer.py), 'nccl' (GPU: vLLM's NCCL
    weight-transfer engine) or 'auto' (nccl when the learner sees CUDA); gloo also beside a GPU learner (one GPU shared
    with an engine). The engines' vLLM transfer engine follows it (`RolloutConfig.weight_transfer`); a CPU learner
    with nccl is refused at start-up (`resolved_backend`)."""
    transport: str = "auto"
    """With the gloo backend: 'auto' (engines on the learner's node read each bucket from shared memory under /dev/shm,
    engines elsewhere get a gloo broadcast), 'shm' (every engine must be on the learner's node) or 'gloo' (broadcast
    to all, as across nodes)."""
    timeout_s: float = 600.0
    """How long a member of the sync group waits for the others (at the gate before a group forms, and in each
    collective)."""

    def validate(self) -> WeightSyncConfig:
        _require(self.bucket_mb >= 1, "weight_sync.bucket_mb", "an integer >= 1", self.bucket_mb)
        _require(self.every_steps >= 1, "weight_sync.every_steps", "an integer >= 1", self.every_steps)
        backends = ("auto", "gloo", "nccl")
        _require(self.backend in backends, "weight_sync.backend", f"one of {backends}", self.backend)
        _require(self.transport in TRANSPORTS, "weight_sync.transport", f"one of {TRANSPORTS}", self.transport)
        shm_ok = self.transport != "shm" or self.backend != "nccl"
        _require(shm_ok, "weight_sync.transport", "'auto' or 'gloo' with weight_sync.backend=nccl", self.transport)
        _require(self.timeout_s > 0, "weight_sync.timeout_s", "a number > 0", self.timeout_s)
        return self

    def resolved_backend(self, cuda: bool) -> str:
        """The backend for a learner on CUDA or not. `auto` is NCCL on CUDA (vLLM's NCCL engine in the engines),
        gloo on CPU (the project's engine). A GPU learner may also take gloo: the weights then go through host memory
        (shared memory on the learner's node), e.g. on one GPU that the learner and an engine share, where NCCL
        refuses two ranks on one device. A CPU learner has no NCCL."""
        allowed = ("auto", "nccl", "gloo") if cuda else ("auto", "gloo")
        names = ", ".join(f"'{name}'" for name in allowed)
        _require(self.backend in allowed, "weight_sync.backend", f"{names} with a {'cuda' if cuda else 'cpu'} learner",
                 self.backend)  # fmt: skip
        return ("nccl" if cuda else "gloo") if self.backend == "auto" else self.backend


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints: consolidated HF weights + DeepSpeed state for an exact resume, written atomically."""

    dir: str = "checkpoints"
    """Where checkpoints go (relative paths are taken under the run's output directory by the caller)."""
    every_steps: int = 0
    """Save every this many learner updates (0: only at the end of training)."""
    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted after a new one is complete (0 keeps all)."""

    def validate(self) -> CheckpointConfig:
        _require(bool(self.dir), "checkpoint.dir", "a directory", self.dir)
        _require(self.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0", self.every_steps)
        _require(self.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0", self.keep_last)
        return self

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after learner update number `step` (1-based)."""
        return self.every_steps > 0 and step % self.every_steps == 0
