"""One learner rank: a DeepSpeed ZeRO-3 engine around the policy, its GRPO update, weight broadcast and checkpoints.

A plain class: pytest, a debugger or `ray.remote(Learner)` (what `LearnerGroup` does) all run the same code. Every
rank runs every method in lockstep: ZeRO-3's forward and backward gather parameter shards collectively, so all ranks
must see the same number of micro-batches (the group gives them equal shares) and call `broadcast_weights` and
`save_checkpoint` together.

The loss of a minibatch is normalised globally: each micro-batch's loss is scaled by its share of the minibatch's
tokens (or sequences) over all ranks, times the world size that DeepSpeed's gradient averaging divides by. A 2-rank
step on a batch therefore changes the weights as a 1-rank step on the same batch does, up to float rounding.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Import order matters: deepspeed's ZeRO-3 patches Tensor.__new__ while it partitions, and a lazy `torch._dynamo`
# import by transformers inside that window fails with "Signature mismatch ... tensor_pynew" (docs cpu-stack.md).
import torch
import torch._dynamo  # noqa: F401  (imported for its side effect, before deepspeed)
import torch.distributed as dist
import torch.utils.checkpoint
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import deepspeed  # isort: skip
import ray

from deepspeed.ops.adam import DeepSpeedCPUAdam  # isort: skip

from actors.vocab import allowed_token_ids
from learner import checkpoint, vision_attention
from learner.batch import MicroBatch, Sample, collate, encode_groups, encode_sft, split_by_tokens
from learner.config import GRPOConfig, LearnerConfig, WeightSyncConfig
from learner.grpo import aggregate, behaviour_weights, entropy_from_logits, kl_penalty, policy_loss
from learner.sft import SFTExample, sft_loss
from learner.weight_sync import Bucket, SyncGroupInfo, SyncPlan, SyncSender, map_segment, plan_buckets
from replay.trajectory import TrajectoryGroup

logger = logging.getLogger(__name__)

# Loss terms, averaged over the update's loss units on all ranks (tokens, or sequences in the seq-mean modes: then a
# micro-batch's aggregate times its units sums exactly, whatever the sharding), and per-token metrics over its tokens.
_LOSS_METRICS = ("loss/policy", "loss/kl", "loss/total", "policy/entropy")
_TOKEN_METRICS = ("policy/clip_fraction", "policy/approx_kl")
# Sampler-vs-learner metrics of the first pass's tokens (before any optimizer step of the update moved the policy).
_FIRST_PASS_METRICS = ("policy/logprob_diff", "policy/is_mean", "policy/is_truncated_share")
_SUM_KEYS = (
    *_LOSS_METRICS,
    "units",
    *_TOKEN_METRICS,
    "tokens",
    *_FIRST_PASS_METRICS,
    "first_pass_tokens",
    "optim/grad_norm",
    "optim/steps",
    "optim/skipped_steps",
)
_MAX_KEYS = ("policy/is_max", "perf/peak_memory_gib")  # the second on GPU only: the update's peak allocation
# Rows x positions of logits normalised at once: bounds the fp32 (rows, V) temporaries of the log-softmax and
# entropy (4096 x 151936 x 4 bytes = 2.5 GB for Qwen2.5-VL's vocabulary) whatever the response length.
_LOGIT_CHUNK_ROWS = 4096


class Learner:
    """One rank of the learner group.

    Args:
        config: the learner's settings (model directory, DeepSpeed preset, optimizer, micro-batch size, ...).
        grpo: the loss settings.
        rank: this rank in the learner world.
        world_size: number of learner ranks.

    Call `setup(master_addr, master_port)` on every rank before anything else; `node_address()` tells rank 0's.
    """

    def __init__(self, config: LearnerConfig, grpo: GRPOConfig, rank: int = 0, world_size: int = 1):
        self.config, self.grpo = config.validate(), grpo.validate()
        self.rank, self.world_size = rank, world_size
        self.step = 0  # update() calls so far
        self.version = 0  # policy version of the last weight sync
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients, over the whole run
        self._sync: SyncSender | None = None  # rank 0's end of the weight-sync group
        self._frozen_sent = False  # frozen parameters go to the engines once per sync group
        self._segment: tuple[str, torch.Tensor] | None = None  # (path, mapping) of the sync group's shared segment

    @staticmethod
    def node_address() -> tuple[str, int]:
        """This node's IP and a free TCP port on it (rank 0's are the learner world's master address)."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1", s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        """Joins the learner world (gloo on CPU, NCCL on GPU), builds the DeepSpeed engine, reference and processor."""
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.device.index or 0),
        )
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)

        self.ds_config = self._deepspeed_config(cuda)
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        model = self._load_model(dtype).train()  # from_pretrained gives eval mode, where HF skips checkpointing
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.config.freeze_vision:
            model.model.visual.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # A torch optimizer where it can be: DeepSpeed's own Adam ops compile with gcc on first use (~80 s). With the
        # optimizer state offloaded to host memory ZeRO-3 requires its CPU Adam (compiled once, ~65 s).
        adam = DeepSpeedCPUAdam if self.config.optimizer_offload else torch.optim.AdamW
        optimizer = adam(trainable, lr=self.config.lr, betas=self.config.betas, weight_decay=self.config.weight_decay)
        warmup = self.config.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.reference = None
        if self.grpo.kl_coef > 0:
            self.reference, *_ = deepspeed.initialize(model=self._load_model(dtype).eval(), config=self.ds_config)

        self.processor = AutoProcessor.from_pretrained(self.config.model_dir)
        tokenizer = self.processor.tokenizer
        allowed = torch.tensor(allowed_token_ids(tokenizer))
        vocab = model.config.text_config.vocab_size
        self.banned = torch.ones(vocab, dtype=torch.bool, device=self.device)  # (V,)
        self.banned[allowed] = False
        self.pad_id = tokenizer.pad_token_id
        self.image_token_id = model.config.image_token_id
        self.filler_id = int(allowed[0])

    def _deepspeed_config(self, cuda: bool) -> dict[str, Any]:
        cfg = self.config
        ds = json.loads(cfg.deepspeed_config_path(cuda).read_text())
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        ds["gradient_accumulation_steps"] = 1  # accumulation is ours: step() ends a minibatch (unmanaged mode)
        ds["train_batch_size"] = cfg.micro_batch_size * self.world_size
        ds["gradient_clipping"] = cfg.grad_clip
        zero = ds["zero_optimization"]
        zero["offload_param"]["device"] = "cpu" if cfg.param_offload else "none"
        zero["offload_optimizer"]["device"] = "cpu" if cfg.optimizer_offload else "none"
        if cfg.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = cfg.param_persistence_threshold
        return ds

    def _load_model(self, dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
        # Every rank loads the whole model (into host memory; a random one on its device) and deepspeed.initialize
        # partitions it. Loading straight into shards needs transformers' HfDeepSpeedConfig, which requires the
        # `accelerate` package (not installed).
        # The config is left as the model directory has it (checkpoints save it): forwards pass use_cache=False.
        if not any(Path(self.config.model_dir).glob("*.safetensors")):  # a random-init model (config only)
            # Drawn from its own stream seeded alike every time, so the reference equals the initial policy (and a
            # restarted learner group without a checkpoint starts from the same weights); the global RNG is untouched.
            # Drawn on the learner's device: a 3B model's random init takes minutes on one CPU thread.
            config = AutoConfig.from_pretrained(self.config.model_dir)
            rng_devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=rng_devices), self.device:
                torch.manual_seed(self.config.seed)
                model = Qwen2_5_VLForConditionalGeneration._from_config(config, torch_dtype=dtype)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.config.model_dir, dtype=dtype)
        model.model.visual.config._attn_implementation = vision_attention.NAME  # one SDPA call a layer, not a window
        return model

    # ----------------------------------------------------------------------------------------------------- update

    def update(self, groups: list[TrajectoryGroup | Any]) -> dict[str, float]:
        """One GRPO update on this rank's share of the batch; returns metrics reduced over all ranks.

        Args:
            groups: trajectory groups, or objects with a `.ref` (replay.BufferItem) / ObjectRefs pointing to them,
                which this rank fetches from Ray's object store itself.

        Returns:
            `loss/policy`, `loss/kl`, `loss/total`, `policy/entropy`, `policy/clip_fraction`, `policy/approx_kl`,
            `policy/logprob_diff` (mean |learner - sampler| log-prob, before the update), `policy/is_mean`,
            `policy/is_max`, `policy/is_truncated_share` (the importance weight learner/sampler before its
            truncation at `grpo.is_cap`, over the same tokens; with `grpo.objective=decoupled` the share is that
            of the tokens dropped), `optim/grad_norm`,
            `optim/lr`, `optim/steps`, `optim/skipped_steps` (in this update), `perf/update_s`, and on GPU
            `perf/peak_memory_gib` (the update's peak allocation, the largest over ranks).
        """
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        groups, lost = _resolve_all(groups)
        # A group whose producer died can't be read (its process owned the object). Every rank must take the same
        # optimizer steps, so when any rank lost a group, all of them skip this update and the driver counts it.
        lost = int(self._all_reduce(torch.tensor([lost]), dist.ReduceOp.MAX))
        if lost:
            logger.warning(
                "rank %d: %d groups of this batch were lost with their actor; skipping the update", self.rank, lost
            )
            return {"learner/skipped_update": 1.0, "learner/lost_groups": float(lost)}
        g = self.grpo
        samples, images = encode_groups(groups, self.processor, g.normalize_std, g.adv_eps, g.unbiased_std)
        counts = self._all_reduce(torch.tensor([len(samples), -len(samples)]), dist.ReduceOp.MAX).tolist()
        if counts[0] != -counts[1]:
            raise ValueError(f"learner ranks got unequal numbers of samples ({-counts[1]}..{counts[0]}): shard evenly")
        longest = max((s.response_len for s in samples), default=1)
        response_len = int(self._all_reduce(torch.tensor([longest]), dist.ReduceOp.MAX))

        minibatches = [list(m) for m in np.array_split(np.arange(len(samples)), self.grpo.num_minibatches)]
        if self.grpo.ppo_epochs > 1 or self.grpo.num_minibatches > 1:
            self._precompute(samples, images, response_len, self.engine, "old_logprobs")
        if self.reference is not None:
            self._precompute(samples, images, response_len, self.reference, "ref_logprobs")

        sums = dict.fromkeys((*_SUM_KEYS, *_MAX_KEYS), 0.0)
        for epoch in range(self.grpo.ppo_epochs):
            for indices in minibatches:
                self._train_minibatch([samples[i] for i in indices], images, response_len, sums, epoch == 0)
        self.step += 1
        return self._reduce_metrics(sums, time.perf_counter() - start)

    def _micro_batches(self, samples: list[Sample], images, response_len: int) -> list[tuple[list[int], MicroBatch]]:
        """This rank's micro-batches, each with the indices of its samples (consecutive, in order). Collective when
        `micro_batch_tokens` is set: the ranks agree on how many micro-batches each runs."""
        ids = (self.pad_id, self.filler_id, self.image_token_id)
        if self.config.micro_batch_tokens is None:
            size = self.config.micro_batch_size
            runs = [list(range(i, min(i + size, len(samples)))) for i in range(0, len(samples), size)]
        else:
            lengths = [len(s.prompt_ids) + s.response_len for s in samples]
            greedy = len(split_by_tokens(lengths, self.config.micro_batch_tokens))
            count = int(self._all_reduce(torch.tensor([greedy]), dist.ReduceOp.MAX))
            runs = split_by_tokens(lengths, self.config.micro_batch_tokens, count)
        return [(run, collate([samples[i] for i in run], images, response_len, *ids, self.device)) for run in runs]

    def _logprobs(
        self, engine, mb: MicroBatch, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of the response tokens as vLLM's sampler reports them ("processed" log-probs).

        That is: the model run with the multimodal RoPE positions (`mb.mm_token_type_ids`), its logits divided by
        the sampling temperature, banned tokens masked (actors/vocab.py), then normalised. The vision tower runs on
        the micro-batch's distinct images only, and each sample gets its image's features through transformers'
        `mm_encoder_outputs`: a group's G samples share one board, which would otherwise be encoded G times (at
        Qwen's pixel cap the tower's share of a 3B forward is about a third). The normaliser is a
        logsumexp over chunks of positions, each recomputed in backward (checkpointed), and only the target logits
        are gathered: beside the model's own (B, K, V) logits no full-vocabulary copy is kept.

        Args:
            engine: the DeepSpeed engine (policy or reference) to run.
            mb: a micro-batch from `collate`.
            temperature: the actors' sampling temperature (`learner.temperature`).
            with_entropy: also return the entropies, which carry a graph only when grad is enabled and
                `grpo.entropy_coef > 0` (otherwise they are logged only, computed without one).

        Returns:
            `(B, T)` log-probs (with grad when grad is enabled), and `(B, T)` entropies in nats or None.
        """
        features = engine.module.get_image_features(mb.pixel_values, mb.image_grid_thw).pooler_output  # (I,) tensors
        encoded = BaseModelOutputWithPooling(pooler_output=[features[i] for i in mb.sample_image])  # (B,) tensors
        out = engine(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            mm_token_type_ids=mb.mm_token_type_ids,
            image_grid_thw=mb.image_grid_thw[mb.sample_image],  # (B, 3): the positions of each sample's image tokens
            mm_encoder_outputs={"image": encoded},
            logits_to_keep=mb.keep,
            use_cache=False,
        )
        logits = out.logits  # (B, K, V)
        entropy_grad = torch.is_grad_enabled() and self.grpo.entropy_coef > 0
        step = max(1, _LOGIT_CHUNK_ROWS // logits.shape[0])
        normalisers, entropies = [], []
        for chunk in logits.split(step, dim=1):  # (B, k, V); split: one backward concatenates every chunk's grad
            if torch.is_grad_enabled():
                lse, entropy = torch.utils.checkpoint.checkpoint(
                    self._normalise, chunk, temperature, with_entropy, entropy_grad, use_reentrant=False
                )
            else:
                lse, entropy = self._normalise(chunk, temperature, with_entropy, False)
            normalisers.append(lse)
            entropies.append(entropy)
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]  # (B, 1)
        target_logits = logits[rows, mb.index, mb.targets].float() / temperature  # (B, T)
        logprobs = target_logits - torch.cat(normalisers, dim=1).gather(1, mb.index)  # (B, T)
        entropy = torch.cat(entropies, dim=1).gather(1, mb.index) if with_entropy else None  # (B, T)
        return logprobs, entropy

    def _normalise(
        self, logits: torch.Tensor, temperature: float, with_entropy: bool, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, k) logsumexp of `logits / temperature` over the allowed tokens, and the entropies when asked."""
        scaled = logits.float() / temperature  # (B, k, V): the one fp32 temporary (two in bf16)
        scaled.masked_fill_(self.banned, float("-inf"))  # the same mask vLLM samples under (allowed_token_ids)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad):
                entropy = entropy_from_logits(scaled)
        return torch.logsumexp(scaled, dim=-1), entropy

    @torch.no_grad()
    def _precompute(self, samples: list[Sample], images, response_len: int, engine, field: str) -> None:
        """Stores each sample's log-probs under `engine`'s current weights (old policy or reference) in `field`."""
        for run, mb in self._micro_batches(samples, images, response_len):
            logprobs, _ = self._logprobs(engine, mb, self.config.temperature)
            for i, row in zip(run, logprobs.cpu(), strict=True):
                setattr(samples[i], field, row[: samples[i].response_len].clone())

    @torch.no_grad()
    def response_logprobs(self, groups: list[TrajectoryGroup | Any]) -> list[list[list[float]]]:
        """Each response's token log-probs under the current weights, computed as the loss computes them.

        At the weights a vLLM engine sampled with, these are the engine's sampling log-probs up to float rounding:
        the learner/sampler parity check (bench/logprob_parity.py) compares the two. Collective under ZeRO-3 (every
        rank calls it, with equal numbers of groups) like `update`.

        Args:
            groups: trajectory groups, or references to them (see `update`).

        Returns:
            `[group][response][token]` log-probs.
        """
        groups = [_resolve(g) for g in groups]
        samples, images = encode_groups(groups, self.processor, self.grpo.normalize_std, self.grpo.adv_eps)
        response_len = max((s.response_len for s in samples), default=1)
        self._precompute(samples, images, response_len, self.engine, "old_logprobs")
        rows = iter([s.old_logprobs.tolist() for s in samples])
        return [[next(rows) for _ in group.response_ids] for group in groups]

    def _sum_norm_scale(self, response_len: int) -> float:
        """Dr.GRPO divides each sequence's token sum by a constant, the response cap (`max_response_len`); the
        aggregation divides by this batch's T, so rescale. 1 for the other modes or when no cap is set."""
        cap = self.config.max_response_len
        return response_len / cap if self.grpo.loss_agg == "seq-mean-token-sum-norm" and cap else 1.0

    def _units(self, mask: torch.Tensor) -> float:
        """What the loss aggregation averages over: tokens (token-mean), or sequences (the seq-mean modes)."""
        if self.grpo.loss_agg == "token-mean":
            return float(mask.sum())
        if self.grpo.loss_agg == "seq-mean-token-mean":
            return float(mask.any(dim=-1).sum())
        return float(mask.shape[0])

    def _train_minibatch(self, samples, images, response_len: int, sums: dict[str, float], first_pass: bool) -> None:
        """Accumulates the minibatch's gradients over its micro-batches and takes one optimizer step."""
        g = self.grpo
        micro = [mb for _, mb in self._micro_batches(samples, images, response_len)]
        total_units = float(self._all_reduce(torch.tensor([sum(self._units(mb.mask) for mb in micro)])))
        for mb in micro:
            logprobs, entropies = self._logprobs(self.engine, mb, self.config.temperature, with_entropy=True)
            entropy = aggregate(entropies, mb.mask, g.loss_agg)
            # The proximal policy: precomputed when an optimizer step comes before this micro-batch's pass; otherwise
            # the weights have not moved since the update began, and this forward's own log-probs are exactly it.
            old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()  # (B, T)
            is_weights = behaviour_weights(old, mb.sampler_logprobs, g.objective, g.is_cap)
            pg_loss, pg_metrics = policy_loss(
                logprobs, old, mb.advantages, mb.mask, g.clip_low, g.clip_high, g.loss_agg, g.dual_clip, is_weights
            )
            kl = torch.zeros((), device=self.device)
            if g.kl_coef > 0:
                kl = aggregate(kl_penalty(logprobs, mb.ref_logprobs, g.kl_estimator), mb.mask, g.loss_agg)
            loss = (pg_loss + g.kl_coef * kl - g.entropy_coef * entropy) * self._sum_norm_scale(response_len)
            # This micro-batch's share of the minibatch over all ranks; x W undoes DeepSpeed's gradient averaging.
            units, tokens = self._units(mb.mask), float(mb.mask.sum())
            self.engine.backward(loss * (units * self.world_size / max(total_units, 1.0)))

            losses = torch.stack([pg_loss, kl, loss, entropy]).detach().tolist()
            for key, value in zip(_LOSS_METRICS, losses, strict=True):
                sums[key] += value * units
            for key in _TOKEN_METRICS:
                sums[key] += pg_metrics[key.removeprefix("policy/")] * tokens
            sums["units"], sums["tokens"] = sums["units"] + units, sums["tokens"] + tokens
            if first_pass:
                self._sum_sampler_metrics(old.detach(), mb, sums)
        self._step_optimizer(sums)

    def _step_optimizer(self, sums: dict[str, float]) -> None:
        """Ends a minibatch (RL or SFT): the optimizer step, its grad norm, or the count of a skipped step."""
        self.engine.step()
        # DeepSpeed's ZeRO-3 step already refuses non-finite gradients (NaN/inf loss included): it zeroes them and
        # leaves weights, optimizer state and the lr schedule untouched. We count and report the skip.
        if self.engine.was_step_applied():
            sums["optim/grad_norm"] += float(self.engine.get_global_grad_norm())
            sums["optim/steps"] += 1
        else:
            self.skipped_steps += 1
            sums["optim/skipped_steps"] += 1
            if self.rank == 0:
                logger.warning("skipped optimizer step in update %d: non-finite loss or gradients", self.step)

    def _sum_sampler_metrics(self, old: torch.Tensor, mb: MicroBatch, sums: dict[str, float]) -> None:
        """Adds a first-pass micro-batch's learner-vs-sampler figures: |old - sampler| log-prob, and the importance
        weight old/sampler before truncation (its sum, its max, how many tokens `grpo.is_cap` truncates)."""
        weights = torch.exp(old - mb.sampler_logprobs)  # (B, T)
        cap = self.grpo.is_cap if self.grpo.is_cap is not None else float("inf")
        values = torch.stack(
            [
                torch.where(mb.mask, (old - mb.sampler_logprobs).abs(), 0.0).sum(),
                torch.where(mb.mask, weights, 0.0).sum(),
                (mb.mask & (weights > cap)).sum(),
                mb.mask.sum(),
                torch.where(mb.mask, weights, 0.0).max(),
            ]
        ).tolist()
        for key, value in zip((*_FIRST_PASS_METRICS, "first_pass_tokens"), values, strict=False):
            sums[key] += value
        sums["policy/is_max"] = max(sums["policy/is_max"], values[-1])

    def _reduce_metrics(self, sums: dict[str, float], elapsed: float) -> dict[str, float]:
        # Every rank sums the same keys (_SUM_KEYS) in one all-reduce and maxes _MAX_KEYS in another; step counters
        # are global already, so /W.
        cuda = self.device.type == "cuda"
        sums["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0
        totals = dict(
            zip(_SUM_KEYS, self._all_reduce(torch.tensor([sums[k] for k in _SUM_KEYS])).tolist(), strict=True)
        )
        maxima = self._all_reduce(torch.tensor([sums[k] for k in _MAX_KEYS]), dist.ReduceOp.MAX).tolist()
        metrics = {k: totals[k] / max(totals["units"], 1.0) for k in _LOSS_METRICS}
        metrics.update({k: totals[k] / max(totals["tokens"], 1.0) for k in _TOKEN_METRICS})
        metrics.update({k: totals[k] / max(totals["first_pass_tokens"], 1.0) for k in _FIRST_PASS_METRICS})
        metrics.update(zip(_MAX_KEYS, maxima, strict=True))
        if not cuda:
            del metrics["perf/peak_memory_gib"]
        metrics.update(self._optimizer_metrics(totals))
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["perf/update_s"] = elapsed
        return metrics

    def _optimizer_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """`optim/grad_norm` (mean over the steps applied), `optim/steps`, `optim/skipped_steps` from the sums over
        ranks of `_step_optimizer`'s counters: every rank counts every (global) step, so each sum is divided by W."""
        steps = totals["optim/steps"] / self.world_size
        return {
            "optim/grad_norm": totals["optim/grad_norm"] / self.world_size / steps if steps else 0.0,
            "optim/steps": steps,
            "optim/skipped_steps": totals["optim/skipped_steps"] / self.world_size,
        }

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    # -------------------------------------------------------------------------------------------------- weights

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights with Hugging Face names, on rank 0 (other ranks get {}); collective: call on every rank.

        Also the late-join path for a single engine: `engine.load_weights(state_dict.items())`.
        """
        state = self.engine._zero3_consolidated_16bit_state_dict()
        return {k: v.cpu() for k, v in state.items()} if self.rank == 0 else {}

    def serve_weight_sync(self, world_size: int, sync: WeightSyncConfig) -> SyncGroupInfo:
        """Rank 0: destroys the previous sync group, if any, and opens a new one's store; the next sync sends every
        parameter (frozen ones included)."""
        if self._sync is not None:
            self._sync.close()
        backend = sync.resolved_backend(self.device.type == "cuda")
        host = self.node_address()[0]
        self._sync = SyncSender.serve(host, world_size, backend, sync.timeout_s, sync.bucket_mb * 2**20, sync.transport)
        self._frozen_sent = False
        self._segment = None  # the old group's
        return self._sync.info

    def join_weight_sync(self) -> None:
        """Rank 0: joins the group opened by `serve_weight_sync`; blocks until every engine worker joined."""
        self._sync.join()

    def weight_plan(self, version: int, bucket_mb: int) -> SyncPlan:
        """The next sync's plan: trainable parameters, plus frozen ones on a group's first sync."""
        full = not self._frozen_sent
        params = [
            (name, tuple(p.ds_shape), p.dtype)
            for name, p in self.engine.module.named_parameters()
            if full or p.requires_grad
        ]
        return plan_buckets(params, bucket_mb * 2**20, version, full)

    def broadcast_weights(self, plan: SyncPlan) -> dict[str, Any]:
        """Every rank: gathers each bucket's ZeRO-3 shards; rank 0 packs and broadcasts them to the sync group. On
        one node with shared memory, the ranks write their shards into it instead (`_write_partitions`).

        A failed broadcast (an engine died) tears the sync group down (see SyncGroup.broadcast), so that the
        surviving engines fail at once, and rank 0 goes on gathering without sending: the gathers are collectives of
        the whole learner world, and a rank that left the loop early would leave the others waiting in theirs. The
        group is then unusable until `serve_weight_sync` opens a new one.

        Returns:
            `gather_s` (ZeRO-3 gathers), `pack_s` (copying into the send buffers) and `broadcast_s` (packing and
            sending, which includes waiting for the engines to load) on rank 0, and `error`: None, or why the
            broadcast failed.
        """
        named = dict(self.engine.module.named_parameters())
        gather_s = 0.0
        error: str | None = None
        start = time.perf_counter()
        written = self._write_partitions(plan, named)
        pack_s = time.perf_counter() - start

        def gathered() -> Iterator[tuple[Bucket, dict[str, torch.Tensor]]]:
            nonlocal gather_s
            for bucket in plan.buckets:
                t0 = time.perf_counter()
                with deepspeed.zero.GatheredParameters([named[slot.name] for slot in bucket.slots]):
                    gather_s += time.perf_counter() - t0
                    yield bucket, {slot.name: named[slot.name].data for slot in bucket.slots}

        buckets = ((bucket, None) for bucket in plan.buckets) if written else gathered()
        if self.rank == 0:
            try:
                pack_s += self._sync.send(plan, buckets)
            except RuntimeError as e:  # the group tore itself down: later syncs fail until a new one forms
                error = f"{type(e).__name__}: {e}"
        for _ in buckets:  # ranks > 0, and rank 0 after a failure: the rest of the gathers
            pass
        broadcast_s = time.perf_counter() - start - gather_s
        if error is None:
            self.version = plan.version
            self._frozen_sent = self._frozen_sent or plan.full
        return {"gather_s": gather_s, "pack_s": pack_s, "broadcast_s": broadcast_s, "error": error}

    def _write_partitions(self, plan: SyncPlan, named: dict[str, torch.nn.Parameter]) -> bool:
        """Every rank: the ZeRO-3 gather through shared memory, where rank 0's sync group has a shared segment
        (learner.weight_sync.SyncGroup) and every learner rank can map it (is on rank 0's node). Each rank copies its
        own partition of every parameter of `plan` to where that part of the full tensor lies in the segment, all
        ranks at once: the segment then holds every bucket, with no gather over gloo and no packing on rank 0.
        DeepSpeed's partition r of a flattened parameter is its elements [r*P, (r+1)*P), P the padded partition size,
        held in `ds_tensor` by every parameter, persistent ones (below `param_persistence_threshold`) included.

        Returns:
            Whether the partitions were written; False (on every rank) leaves the buckets to the usual gathers.
        """
        offer: list[tuple[str, int] | None] = [None]  # (path, generation) of rank 0's segment
        if self.rank == 0:
            try:
                offer[0] = self._sync.prepare(plan)
            except OSError as e:  # e.g. /dev/shm full: the gathers and rank 0's packing take over
                logger.warning("weight sync: no shared segment for the learner ranks (%s); gathering instead", e)
        dist.broadcast_object_list(offer, src=0)
        if offer[0] is not None and (self._segment is None or self._segment[0] != offer[0][0]):
            path = offer[0][0]  # a new segment: its name exists until the sync ends (unless not on this node)
            self._segment = (path, map_segment(path)) if os.path.exists(path) else None
        mapped = torch.tensor([offer[0] is not None and self._segment is not None], dtype=torch.int64)
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN)
        if not mapped.item():
            return False
        segment = self._segment[1]
        offsets, _ = plan.layout
        for bucket, offset in zip(plan.buckets, offsets, strict=True):
            flat = segment[offset : offset + bucket.nbytes].view(bucket.torch_dtype)
            for slot in bucket.slots:
                # Every parameter, persistent ones included, keeps this rank's partition in ds_tensor (a persistent
                # one's `data` is empty until its first gather: the sync before the first step must not read it).
                part = named[slot.name].ds_tensor.reshape(-1)
                begin = min(self.rank * part.numel(), slot.numel)
                end = min(begin + part.numel(), slot.numel)
                flat[slot.offset + begin : slot.offset + end].copy_(part[: end - begin])
        dist.barrier()
        return True

    # ----------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, root: str, run_config: dict[str, Any], keep_last: int) -> str:
        """Every rank: writes checkpoint `root/step-<step>` atomically (see learner.checkpoint); returns its path."""
        tmp = checkpoint.begin(root, self.step, self.rank)
        dist.barrier()
        trainer_state = {"step": self.step, "version": self.version, "skipped_steps": self.skipped_steps}
        # Nested: DeepSpeed drops client keys that clash with its own (it has a "skipped_steps").
        client_state = {"learner": trainer_state}
        self.engine.save_checkpoint(str(tmp / checkpoint.DEEPSPEED_DIR), tag="state", client_state=client_state)
        checkpoint.save_rng(tmp, self.rank)
        state = self.consolidated_state_dict()
        if self.rank == 0:
            checkpoint.save_hf(tmp, self.engine.module, state, self.config.model_dir)
            checkpoint.save_meta(tmp, trainer_state, run_config)
        dist.barrier()
        final = checkpoint.commit(root, tmp, keep_last) if self.rank == 0 else None
        dist.barrier()
        return str(final or checkpoint.path_for(root, self.step))

    def load_checkpoint(self, path: str) -> dict[str, int]:
        """Every rank: restores weights, optimizer, lr schedule, step, version and RNG from a checkpoint directory."""
        path = Path(path)
        _, client_state = self.engine.load_checkpoint(str(path / checkpoint.DEEPSPEED_DIR), tag="state")
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed state under {path / checkpoint.DEEPSPEED_DIR}")
        trainer_state = client_state["learner"]
        self.step, self.version = trainer_state["step"], trainer_state["version"]
        self.skipped_steps = trainer_state["skipped_steps"]
        checkpoint.load_rng(path, self.rank)
        self._frozen_sent = False  # engines must be sent everything again
        return {"step": self.step, "version": self.version}

    # ------------------------------------------------------------------------------------------- cold start (SFT)

    def sft_update(self, examples: list[SFTExample], lr: float) -> dict[str, float]:
        """One supervised optimizer step on this rank's share of a batch of teacher responses (G1's cold start).

        The RL update's code path: the same engine, prompt (the rollout actor's chat template), M-RoPE positions and
        allowed-token mask (`_logprobs` at temperature 1: the policy's own distribution). The token-mean NLL of each
        micro-batch is scaled by its share of the batch's tokens on all ranks, as `_train_minibatch` scales the
        policy loss, so W ranks take the step one rank would. Every rank must get as many examples.

        Args:
            examples: this rank's share of the batch.
            lr: this step's learning rate: the driver owns the SFT schedule (it knows the run's length).

        Returns:
            `loss/sft` (token-mean NLL before the step), `optim/grad_norm`, `optim/lr`, `optim/steps`,
            `optim/skipped_steps`, `perf/update_s`.
        """
        start = time.perf_counter()
        for group in self.scheduler.optimizer.param_groups:  # the scheduler sets its own lr after each step
            group["lr"] = lr
        sums = {"optim/grad_norm": 0.0, "optim/steps": 0.0, "optim/skipped_steps": 0.0}
        micro, total_tokens = self._sft_micro_batches(examples)
        nll_sum = 0.0
        for mb in micro:
            logprobs, _ = self._logprobs(self.engine, mb, 1.0)
            loss, _ = sft_loss(logprobs, mb.mask)
            tokens = float(mb.mask.sum())
            self.engine.backward(loss * (tokens * self.world_size / max(total_tokens, 1.0)))
            nll_sum += float(loss.detach()) * tokens
        self._step_optimizer(sums)
        self.step += 1
        keys = ("loss/sft", *sums)
        totals = dict(zip(keys, self._all_reduce(torch.tensor([nll_sum, *sums.values()])).tolist(), strict=True))
        return {
            "loss/sft": totals["loss/sft"] / max(total_tokens, 1.0),
            **self._optimizer_metrics(totals),
            "optim/lr": lr,
            "perf/update_s": time.perf_counter() - start,
        }

    @torch.no_grad()
    def sft_eval(self, examples: list[SFTExample]) -> dict[str, float]:
        """Token-mean NLL of held-out teacher responses over all ranks (every rank must get as many examples).

        Returns:
            `loss/sft_eval`, and `sft/eval_tokens` (how many tokens it averages).
        """
        micro, total_tokens = self._sft_micro_batches(examples)
        nll_sum = 0.0
        for mb in micro:
            logprobs, _ = self._logprobs(self.engine, mb, 1.0)
            nll_sum += float(sft_loss(logprobs, mb.mask)[0]) * float(mb.mask.sum())
        nll = float(self._all_reduce(torch.tensor([nll_sum])))
        return {"loss/sft_eval": nll / max(total_tokens, 1.0), "sft/eval_tokens": total_tokens}

    def _sft_micro_batches(self, examples: list[SFTExample]) -> tuple[list[MicroBatch], float]:
        """This rank's micro-batches of `examples`, padded to the longest response on any rank, and the number of
        response tokens of the whole batch (all ranks)."""
        samples, images = encode_sft(examples, self.processor)
        longest = max((s.response_len for s in samples), default=1)
        response_len = int(self._all_reduce(torch.tensor([longest]), dist.ReduceOp.MAX))
        total_tokens = float(self._all_reduce(torch.tensor([sum(s.response_len for s in samples)])))
        return [mb for _, mb in self._micro_batches(samples, images, response_len)], total_tokens


def _resolve_all(items: list[Any]) -> tuple[list[TrajectoryGroup], int]:
    """The groups of `items` that can still be read, and how many can't (their owner, a rollout actor, died)."""
    groups, lost = [], 0
    for item in items:
        try:
            groups.append(_resolve(item))
        except ray.exceptions.ObjectLostError:  # OwnerDiedError among them
            lost += 1
    return groups, lost


def _resolve(item: Any) -> TrajectoryGroup:
    """A trajectory group from itself, a BufferItem (`.ref`) or an ObjectRef: refs are pulled from the object store."""
    if isinstance(item, TrajectoryGroup):
        return item
    return ray.get(getattr(item, "ref", item))
