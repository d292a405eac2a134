"""GRPO-family math as pure torch functions: advantages, policy loss, loss aggregation, KL, entropy.

Nothing here imports Ray, DeepSpeed or vLLM, so the same functions serve the ZeRO-3 learner, a single-process
debugger and the unit tests. Shapes: `B` sequences (responses), `T` response tokens per sequence (right-padded),
`V` vocabulary size. Every `mask` is `(B, T)`, true (or 1) on real response tokens.

Masked positions may hold any NaN-free garbage, -inf included (e.g. log-probs of padding). Masking therefore goes
through `torch.where`, never through multiplication: `0 * inf` is NaN, in the value and in the gradient.

Variants follow the papers and peers listed in docs/paper.md: GRPO (DeepSeekMath, G1/EasyR1), Dr.GRPO
(https://arxiv.org/abs/2503.20783: no std scaling, constant length normaliser), DAPO
(https://arxiv.org/abs/2503.14476: clip-higher, token-level mean), dual clip (https://arxiv.org/abs/1912.09729, as in
verl and OpenRLHF) and truncated importance sampling (verl's TIS).

Three policies meet in the loss (`grpo.objective`). The behaviour policy sampled the tokens: the vLLM engines, whose
kernels differ from the learner's and whose weights, in async mode, are up to `buffer.max_staleness` versions old.
The proximal policy is the learner's weights when the update starts; the learner computes its log-probs (before
the first optimizer step, or in that step's own forward when it is the only one). The current policy is trained.
The PPO ratio is always current/proximal, so the trust region is around the learner's own weights however old the
data is, and each token's loss is weighted by proximal/behaviour (`behaviour_weights`). The two objectives differ in
what a weight above `grpo.is_cap` does:
- `ppo` truncates it at the cap (verl's TIS); without a cap there is no correction.
- `decoupled` drops the token from the loss (weight 0), as AReaL's decoupled PPO objective does
  (https://arxiv.org/abs/2505.24298, `behav_imp_weight_cap`): a token the sampler found that much less likely than
  the proximal policy does is treated as too stale to reweight, not counted at the cap. A dropped token still counts
  in the aggregation's normaliser, as in AReaL, so dropping does not scale up the others. Without a cap the weight is
  used as it is.
Both leave an on-policy token (weight 1) as it is, so they give the same loss when behaviour == proximal.
"""

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

# exp() of a log-ratio beyond this is treated as saturated; verl clamps at the same bound.
_MAX_LOGRATIO = 20.0
# Bound of one token's k3 KL estimate (verl's low_var_kl and OpenRLHF clamp at the same value): a single token far from
# the reference would otherwise contribute up to exp(20) and swamp the rest of the batch's KL term.
_MAX_TOKEN_KL = 10.0

FnT = TypeVar("FnT", bound=Callable[..., Tensor])


class Registry(Generic[FnT]):
    """Functions registered by name, so configs can pick them by string and typos fail loudly.

    Args:
        kind: What the registry holds, used in error messages (e.g. "loss aggregation").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, FnT] = {}

    def register(self, name: str) -> Callable[[FnT], FnT]:
        """Decorator adding a function under `name`; a second function under the same name is an error."""

        def add(fn: FnT) -> FnT:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._fns[name].__name__})")
            self._fns[name] = fn
            return fn

        return add

    def get(self, name: str) -> FnT:
        """The function registered under `name`; an unknown name raises ValueError listing the valid ones."""
        if name not in self._fns:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._fns[name]

    def names(self) -> tuple[str, ...]:
        """Registered names in registration order (for config validation and help texts)."""
        return tuple(self._fns)


AGGREGATIONS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("loss aggregation")
KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator")
OBJECTIVES: Registry[Callable[[Tensor, Tensor, float | None], Tensor | None]] = Registry("policy objective")


def group_advantages(
    rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6, unbiased_std: bool = True
) -> Tensor:
    """Group-relative advantages: each response's reward against the other responses to the same state.

    GRPO (and G1's recipe) uses `(r - mean) / (std + eps)`; Dr.GRPO drops the division (`normalize_std=False`)
    because scaling by 1/std over-weights groups whose rewards barely differ (too easy or too hard states).

    The std is the unbiased std (ddof 1) by default, as the paper's EasyR1 and verl compute it (`torch.std`):
    `[1, 1, 1, 0]` -> `+0.5, +0.5, +0.5, -1.5`. `unbiased_std=False` gives the population std (ddof 0):
    `+0.577, +0.577, +0.577, -1.732` on the same group. The two differ by the constant factor sqrt((G - 1) / G) for
    every group of size G, i.e. only in the effective learning rate.

    A group whose rewards are all equal carries no learning signal and gets exactly zero advantage (never NaN or
    eps-amplified rounding error); so does every group of size 1.

    Args:
        rewards: `(num_groups, G)` total reward of each of the G responses sampled from one state.
        normalize_std: Divide by the group std (GRPO); False gives Dr.GRPO's `r - mean`.
        eps: Added to the std before dividing, so near-identical rewards don't explode.
        unbiased_std: Use the unbiased std (ddof 1, torch.std's default); False: the population std (ddof 0).

    Returns:
        `(num_groups, G)` advantages, floating point.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (num_groups, G), got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    group_size = rewards.shape[1]
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (num_groups, G)
    if normalize_std:
        # max(., 1) keeps G == 1 finite without torch.std's degrees-of-freedom warning; those groups are zeroed below.
        dof = max(group_size - int(unbiased_std), 1)
        std = (centered.square().sum(dim=1, keepdim=True) / dof).sqrt()  # (num_groups, 1)
        centered = centered / (std + eps)
    identical = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (num_groups, 1)
    return torch.where(identical, torch.zeros_like(centered), centered)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over positions where `mask` is true; 0 where there are none.

    Args:
        values: Any shape; masked positions may hold -inf.
        mask: Same shape as `values`, bool or 0/1.
        dim: Reduce along this dimension only; None reduces everything to a scalar.

    Returns:
        Scalar, or `values` reduced along `dim`.
    """
    mask = mask.bool()
    total = torch.where(mask, values, 0.0).sum(dim=dim)
    count = mask.sum(dim=dim).clamp(min=1)
    return total / count


def aggregate(values: Tensor, mask: Tensor, agg: str) -> Tensor:
    """Reduce per-token loss terms to one scalar; shared by the policy, KL and entropy terms.

    Args:
        values: `(B, T)` per-token terms.
        mask: `(B, T)` response-token mask.
        agg: A name in `AGGREGATIONS.names()`: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm".

    Returns:
        Scalar loss.
    """
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(f"values and mask must both be (B, T), got {tuple(values.shape)} and {tuple(mask.shape)}")
    return AGGREGATIONS.get(agg)(values, mask.bool())


@AGGREGATIONS.register("token-mean")
def _token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Every token of the batch weighs the same (G1/EasyR1, DAPO): long responses weigh more in total."""
    return masked_mean(values, mask)


@AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Original GRPO: mean over each response's tokens, then over responses that have any token.

    Dr.GRPO points out the per-response 1/length biases towards long wrong answers (their tokens weigh less).
    """
    per_seq = masked_mean(values, mask, dim=-1)  # (B,)
    return masked_mean(per_seq, mask.any(dim=-1))


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(values: Tensor, mask: Tensor) -> Tensor:
    """Dr.GRPO: sum over each response's tokens divided by the constant T, then mean over all B responses.

    The normaliser must not depend on the batch's content, so pad the response dimension to the configured
    maximum response length: T is `values.shape[-1]`.
    """
    per_seq = torch.where(mask, values, 0.0).sum(dim=-1) / values.shape[-1]  # (B,)
    return per_seq.mean()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg: str,
    dual_clip: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip surrogate loss with asymmetric clipping, optional dual clip and importance-sampling weights.

    Per token, with ratio r = exp(logprobs - old_logprobs) and advantage A:
    `loss = max(-A * r, -A * clamp(r, 1 - clip_low, 1 + clip_high))`. A clip_high above clip_low is DAPO's
    clip-higher (0.28 vs 0.2), which keeps low-probability tokens explorable. With `dual_clip = c`, tokens with
    A < 0 are further bounded by `-A * c`, so one token with a huge ratio cannot dominate the update.
    `is_weights` multiply the clipped per-token loss as constants (see `behaviour_weights`).

    Args:
        logprobs: `(B, T)` log-probs of the response tokens under the policy being trained (with grad).
        old_logprobs: `(B, T)` log-probs under the weights that define the trust region (no grad needed).
        advantages: `(B,)` per sequence or `(B, T)` per token.
        mask: `(B, T)` response-token mask.
        clip_low: Lower clip range, ratio floored at 1 - clip_low; in [0, 1].
        clip_high: Upper clip range, ratio capped at 1 + clip_high; >= 0.
        agg: Loss aggregation name, see `aggregate`.
        dual_clip: Dual-clip constant c > 1 (verl's default 3.0), or None for plain PPO clipping.
        is_weights: `(B, T)` importance-sampling weights, or None.

    Returns:
        The scalar loss (to minimise) and metrics: `pg_loss`, `clip_fraction` (tokens whose gradient the clip
        removes), `clip_fraction_low`, `clip_fraction_high`, `dual_clip_fraction`, `approx_kl` (k3 of old vs
        current, >= 0), `ratio_mean`, `ratio_max`, and `is_weight_mean` when `is_weights` is given.
    """
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1], got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if logprobs.dim() != 2 or not logprobs.shape == old_logprobs.shape == mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be (B, T), got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)} and {tuple(mask.shape)}"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    if is_weights is not None and is_weights.shape != logprobs.shape:
        raise ValueError(f"is_weights must be (B, T) = {tuple(logprobs.shape)}, got {tuple(is_weights.shape)}")
    mask = mask.bool()

    # Two barriers keep padding garbage (-inf - -inf = NaN, inf advantages) out of the loss: this where() stops the
    # gradient reaching masked log-probs whatever the products below hold, and aggregate() drops masked values.
    logratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0).clamp(-_MAX_LOGRATIO, _MAX_LOGRATIO)
    ratio = logratio.exp()  # (B, T)
    advantages = advantages.detach()  # (B, T)
    pg_losses = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        pg_losses = torch.where(advantages < 0, torch.minimum(pg_losses, -advantages * dual_clip), pg_losses)
    if is_weights is not None:
        pg_losses = pg_losses * is_weights.detach()
    loss = aggregate(pg_losses, mask, agg)

    with torch.no_grad():
        clipped_high = (ratio > 1.0 + clip_high) & (advantages > 0)
        clipped_low = (ratio < 1.0 - clip_low) & (advantages < 0)
        dual_clipped = (ratio > dual_clip) & (advantages < 0) if dual_clip is not None else torch.zeros_like(mask)
        metrics = {
            "pg_loss": loss.detach(),
            "clip_fraction": masked_mean((clipped_high | clipped_low).float(), mask),
            "clip_fraction_low": masked_mean(clipped_low.float(), mask),
            "clip_fraction_high": masked_mean(clipped_high.float(), mask),
            "dual_clip_fraction": masked_mean(dual_clipped.float(), mask),
            "approx_kl": masked_mean(ratio - 1.0 - logratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, 0.0).max(),
        }
        if is_weights is not None:
            metrics["is_weight_mean"] = masked_mean(is_weights, mask)
        # One device-to-host copy for all metrics: on GPU each .item() would be its own sync point.
        values = torch.stack([v.float() for v in metrics.values()]).tolist()
    return loss, dict(zip(metrics, values, strict=True))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

    With logratio = logprobs - ref_logprobs (tokens sampled from the policy): k1 = logratio (unbiased, can be
    negative, high variance); k2 = logratio^2 / 2 (biased, low variance, >= 0); k3 = exp(-logratio) + logratio - 1
    (unbiased, >= 0, low variance; G1's choice with coefficient 1e-2). The log-ratio is clamped to [-20, 20], which
    keeps the k1/k2 gradients finite on -inf padding; a NaN from -inf - -inf (padding in both) becomes 0 with zero
    gradient. Each token's k3 is then capped at 10, as verl and OpenRLHF do: one token far off the reference must not
    dominate the batch's KL (beyond the cap its gradient is zero). Reduce the result with `aggregate(kl, mask, agg)`.

    Args:
        logprobs: `(B, T)` log-probs of the response tokens under the policy (with grad).
        ref_logprobs: `(B, T)` log-probs under the frozen reference model.
        estimator: A name in `KL_ESTIMATORS.names()`: "k1", "k2" or "k3".

    Returns:
        `(B, T)` per-token KL estimates.
    """
    estimate = KL_ESTIMATORS.get(estimator)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    logratio = torch.nan_to_num(logprobs - ref_logprobs.detach(), nan=0.0).clamp(-_MAX_LOGRATIO, _MAX_LOGRATIO)
    return estimate(logratio)


@KL_ESTIMATORS.register("k1")
def _kl_k1(logratio: Tensor) -> Tensor:
    return logratio


@KL_ESTIMATORS.register("k2")
def _kl_k2(logratio: Tensor) -> Tensor:
    return 0.5 * logratio.square()


@KL_ESTIMATORS.register("k3")
def _kl_k3(logratio: Tensor) -> Tensor:
    # exp(x) - x - 1 with x = ref - logp; expm1 keeps precision when the two models nearly agree.
    return (torch.expm1(-logratio) + logratio).clamp(max=_MAX_TOKEN_KL)


def truncated_is_weights(learner_old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights correcting for tokens sampled by other weights (verl's TIS).

    The actors sample with vLLM, under weights that may be several versions old (async mode) and with kernels
    that differ numerically from the learner's. `min(pi_old / pi_sampler, cap)` reweights each token to the
    learner's old policy; the cap bounds the variance a rare token could add.

    Args:
        learner_old_logprobs: `(B, T)` log-probs of the response tokens recomputed by the learner.
        sampler_logprobs: `(B, T)` log-probs the actor's vLLM engine reported when sampling.
        cap: Upper bound on each weight, > 0.

    Returns:
        `(B, T)` detached weights in [0, cap]; masked positions may hold garbage (policy_loss masks them).
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    return torch.exp(learner_old_logprobs.detach() - sampler_logprobs.detach()).clamp(max=cap)


def behaviour_weights(
    proximal_logprobs: Tensor, behaviour_logprobs: Tensor, objective: str, cap: float | None
) -> Tensor | None:
    """Per-token importance weights proximal/behaviour for `policy_loss`, as the objective treats those above `cap`.

    Args:
        proximal_logprobs: `(B, T)` log-probs of the response tokens under the learner's weights at the start of
            the update (recomputed by the learner).
        behaviour_logprobs: `(B, T)` log-probs the actor's vLLM engine reported when sampling.
        objective: A name in `OBJECTIVES.names()`: "ppo" (truncate at `cap`) or "decoupled" (drop above `cap`).
        cap: Bound on a weight (>= 1 in configs), or None: no correction under "ppo", raw weights under "decoupled".

    Returns:
        `(B, T)` detached weights, or None when there is nothing to correct; masked positions may hold garbage.
    """
    return OBJECTIVES.get(objective)(proximal_logprobs.detach(), behaviour_logprobs.detach(), cap)


@OBJECTIVES.register("ppo")
def _truncated_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, cap: float | None) -> Tensor | None:
    return None if cap is None else truncated_is_weights(proximal_logprobs, behaviour_logprobs, cap)


@OBJECTIVES.register("decoupled")
def _decoupled_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, cap: float | None) -> Tensor:
    weights = torch.exp(proximal_logprobs - behaviour_logprobs)  # (B, T)
    # `<=` is false for NaN (padding's -inf - -inf), so such positions become 0 too.
    return weights if cap is None else torch.where(weights <= cap, weights, 0.0)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the policy's next-token distribution at every position, computed in log space.

    `H = -sum(p * log p)` with `log p = logits - logsumexp(logits)`. Logits set to -inf (banned tokens) contribute
    0 and zero gradient, not NaN. Holds about three `(B, T, V)` temporaries: chunk over T for large vocabularies.

    Args:
        logits: `(B, T, V)` unnormalised next-token scores.

    Returns:
        `(B, T)` entropies in nats.
    """
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    p = logp.exp()  # (B, T, V)
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)
