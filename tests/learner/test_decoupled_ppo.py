"""The importance correction of stale samples (`grpo.objective`): behaviour, proximal and current policy.

The loss functions on padded (B, T) batches and a hand-derived case, then one real 1-rank DeepSpeed update on the
tiny model with behaviour log-probs made stale by known factors.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import ray
import torch

from learner import config as learner_config
from learner.config import GRPOConfig, LearnerConfig
from learner.grpo import OBJECTIVES, behaviour_weights, group_advantages, policy_loss
from learner.grpo_learner import Learner

INF = float("inf")
CAP = 2.0


def _padded_batch(seed: int, b: int = 6, t: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Proximal log-probs `(B, T)` holding -inf after each response's end, its mask, and `(B,)` advantages."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t)[None] < lengths[:, None]  # (B, T)
    proximal = -3.0 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    advantages = torch.randn(b, generator=gen, dtype=torch.float64)
    return torch.where(mask, proximal, -INF), mask, advantages


def _loss_and_grad(current, proximal, behaviour, advantages, mask, objective, agg="token-mean", dual_clip=None):
    current = current.clone().requires_grad_()
    weights = behaviour_weights(proximal, behaviour, objective, CAP)
    loss, metrics = policy_loss(current, proximal, advantages, mask, 0.2, 0.2, agg, dual_clip, weights)
    loss.backward()
    return loss.item(), current.grad, metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_decoupled_equals_ppo_and_no_correction_when_behaviour_is_proximal(agg, dual_clip):
    proximal, mask, advantages = _padded_batch(seed=0)
    gen = torch.Generator().manual_seed(1)
    current = torch.where(mask, proximal + 0.4 * torch.randn(proximal.shape, generator=gen, dtype=torch.float64), -INF)
    results = [
        _loss_and_grad(current, proximal, proximal, advantages, mask, objective, agg, dual_clip)
        for objective in OBJECTIVES.names()
    ]
    current = current.clone().requires_grad_()
    plain, _ = policy_loss(current, proximal, advantages, mask, 0.2, 0.2, agg, dual_clip)
    plain.backward()
    for loss, grad, metrics in results:
        assert metrics["clip_fraction"] > 0  # the ratios are varied enough to exercise the clip
        assert loss == pytest.approx(plain.item(), rel=1e-12)
        assert torch.allclose(grad, current.grad, atol=1e-15) and torch.isfinite(grad).all()


def test_stale_tokens_above_the_cap_are_dropped_and_the_ratio_is_clipped_around_the_proximal_policy():
    # A batch of two responses (A = +1, A = -2) with a padded last token; per token the factors
    # w = proximal/behaviour (the staleness) and r = current/proximal (the learner's own step), token-mean over 5.
    w = torch.tensor([[1.5, 3.0, 1.5], [0.5, 0.25, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0, 1.1], [0.5, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    proximal = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -INF]], dtype=torch.float64)
    behaviour = torch.where(mask, proximal - w.log(), -INF)
    current = proximal + r.log()

    weights = behaviour_weights(proximal, behaviour, "decoupled", CAP)
    assert torch.allclose(weights[mask], torch.tensor([1.5, 0.0, 1.5, 0.5, 0.25], dtype=torch.float64))
    assert weights[1, 2] == 0.0  # padding: exp(-inf - -inf) is NaN, which is not <= cap
    truncated = behaviour_weights(proximal, behaviour, "ppo", CAP)
    assert torch.allclose(truncated[mask], torch.tensor([1.5, 2.0, 1.5, 0.5, 0.25], dtype=torch.float64))

    loss, grad, _ = _loss_and_grad(current, proximal, behaviour, advantages, mask, "decoupled")
    # d/dlogp of -A * r * w is -A * r * w where the clip is inactive. Token (0, 1) is dropped; token (0, 2) is inside
    # the trust region around the proximal policy (r = 1.1) although current/behaviour = 1.65 is not; token (1, 0)
    # is clipped (A < 0, r = 0.5 < 0.8): a constant -A * 0.8 * w, no gradient.
    expected = torch.tensor([[-1.5, 0.0, -1.1 * 1.5], [0.0, 2.0 * 0.25, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(grad, expected, atol=1e-12)
    assert loss == pytest.approx((-1.5 + 0.0 - 1.1 * 1.5 + 2.0 * 0.8 * 0.5 + 2.0 * 0.25) / 5, rel=1e-12)
    _, ppo_grad, _ = _loss_and_grad(current, proximal, behaviour, advantages, mask, "ppo")
    assert ppo_grad[0, 1].item() == pytest.approx(-2.0 / 5)  # ppo counts the same token at the cap


def test_without_a_cap_ppo_does_not_correct_and_decoupled_keeps_the_raw_weights():
    proximal = torch.tensor([[0.0, -1.0]], requires_grad=True)
    behaviour = torch.tensor([[-math.log(5.0), -1.0]])
    assert behaviour_weights(proximal, behaviour, "ppo", None) is None
    weights = behaviour_weights(proximal, behaviour, "decoupled", None)
    assert torch.allclose(weights, torch.tensor([[5.0, 1.0]])) and not weights.requires_grad


def test_objective_names_are_the_configs_and_unknown_ones_are_rejected():
    assert OBJECTIVES.names() == learner_config.OBJECTIVES
    with pytest.raises(ValueError, match="ppo, decoupled"):
        behaviour_weights(torch.zeros(1, 1), torch.zeros(1, 1), "areal", CAP)
    with pytest.raises(
        ValueError, match=r"grpo.objective='areal' is not allowed: expected one of \('ppo', 'decoupled'\)"
    ):
        GRPOConfig(objective="areal").validate()


def test_decoupled_update_drops_stale_tokens_and_clips_around_the_learners_weights(
    ray_local, tiny_model_dir, make_groups
):
    # One epoch, one minibatch: the proximal log-probs are the update's own forward (no optimizer step before it).
    # The behaviour log-probs are the learner's own divided by known factors, so every weight is known.
    groups = make_groups(2, seed=70)
    config = LearnerConfig(model_dir=str(tiny_model_dir), micro_batch_size=3)
    learner = ray.remote(num_cpus=0.5)(Learner).remote(config, GRPOConfig(objective="decoupled", is_cap=CAP), 0, 1)
    try:
        ray.get(learner.setup.remote(*ray.get(learner.node_address.remote())))
        proximal = ray.get(learner.response_logprobs.remote(groups))
        # Drawn per token: a pattern shared by every response would cancel in the loss (advantages sum to 0 per group).
        rng = np.random.default_rng(0)
        weights = [[rng.choice([0.5, 1.5, 3.0, 1.0], size=len(row)).tolist() for row in rows] for rows in proximal]
        stale = [
            dataclasses.replace(
                group,
                response_logprobs=[
                    (np.asarray(lp) - np.log(ws)).tolist() for lp, ws in zip(rows, group_ws, strict=True)
                ],
            )
            for group, rows, group_ws in zip(groups, proximal, weights, strict=True)
        ]
        metrics = ray.get(learner.update.remote(stale))
    finally:
        ray.kill(learner)

    flat = np.concatenate([np.asarray(ws) for group_ws in weights for ws in group_ws])
    assert metrics["policy/is_mean"] == pytest.approx(flat.mean(), rel=1e-4)
    assert metrics["policy/is_max"] == pytest.approx(3.0, rel=1e-4)
    assert 0 < metrics["policy/is_truncated_share"] == pytest.approx((flat > CAP).mean())  # the share dropped (3.0)
    # The ratio is current/proximal = 1 on this single pass: nothing clipped, whatever the behaviour policy was.
    assert metrics["policy/clip_fraction"] == 0.0 and metrics["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    # token-mean of -A * w with the dropped tokens' w = 0 (ppo would count them at w = 2).
    terms = [
        -adv * (w if w <= CAP else 0.0)
        for group, group_ws in zip(groups, weights, strict=True)
        for adv, ws in zip(
            group_advantages(torch.from_numpy(group.total_rewards())[None])[0].tolist(), group_ws, strict=True
        )
        for w in ws
    ]
    assert metrics["loss/policy"] == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert metrics["optim/steps"] == 1
