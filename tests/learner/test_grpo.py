"""GRPO-family math against hand-computed cases, closed forms and reference Python loops."""

import math
import statistics

import pytest
import torch

from learner.grpo import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    Registry,
    aggregate,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    truncated_is_weights,
)

INF = float("inf")


def _allclose(actual: torch.Tensor, expected: list | torch.Tensor, atol: float = 1e-6) -> bool:
    return torch.allclose(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol)


# ---------------------------------------------------------------- advantages


def test_unbiased_std_by_default_as_torch_std_in_easyr1_and_verl():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(rewards)
    assert _allclose(adv, [[0.5, 0.5, 0.5, -1.5]], atol=1e-5)
    assert _allclose(adv, (rewards - rewards.mean()) / (rewards.std() + 1e-6))


def test_population_std_on_request():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), unbiased_std=False)
    assert _allclose(adv, [[0.57735, 0.57735, 0.57735, -1.73205]], atol=1e-4)


def test_dr_grpo_only_centres():
    adv = group_advantages(torch.tensor([[3.0, 0.0, 0.0, 1.0]]), normalize_std=False)
    assert _allclose(adv, [[2.0, -1.0, -1.0, 0.0]])


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("unbiased_std", [True, False])
def test_identical_rewards_and_single_response_give_exact_zero(normalize_std, unbiased_std):
    # 0.1 is not exactly representable: a naive mean leaves ~1e-17 residue that / (std + eps) would amplify.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [7.3, 7.3, 7.3], [1.0, 2.0, 3.0]], dtype=torch.float64)
    adv = group_advantages(rewards, normalize_std=normalize_std, unbiased_std=unbiased_std)
    assert torch.equal(adv[:2], torch.zeros(2, 3, dtype=torch.float64))
    assert adv[2].abs().min() == 0.0 and adv[2].abs().max() > 0.5  # the varied group still carries signal
    single = group_advantages(torch.tensor([[5.0], [-2.0]]), normalize_std=normalize_std, unbiased_std=unbiased_std)
    assert torch.equal(single, torch.zeros(2, 1))


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("unbiased_std", [True, False])
def test_vectorized_advantages_equal_a_per_group_loop(normalize_std, unbiased_std):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (64, 5), generator=gen).double() + torch.rand(64, 1, generator=gen)
    eps = 1e-6
    expected = []
    for group in rewards.tolist():
        mean = statistics.fmean(group)
        std = (statistics.stdev if unbiased_std else statistics.pstdev)(group)
        scale = 1.0 / (std + eps) if normalize_std else 1.0
        expected.append([0.0 if len(set(group)) == 1 else (r - mean) * scale for r in group])
    actual = group_advantages(rewards, normalize_std=normalize_std, eps=eps, unbiased_std=unbiased_std)
    assert _allclose(actual, expected, atol=1e-9)


def test_advantages_reject_non_2d_rewards():
    with pytest.raises(ValueError, match="num_groups, G"):
        group_advantages(torch.ones(4))


def test_integer_rewards_give_float_advantages():
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.is_floating_point() and _allclose(adv, [[0.5**0.5, -(0.5**0.5)]], atol=1e-5)  # unbiased std 2**-0.5


# ---------------------------------------------------------------- policy loss: clipping


def _token_loss(ratio: float, adv: float, clip_low: float = 0.2, clip_high: float = 0.28, dual_clip=None) -> float:
    """The policy loss of one token with the given ratio (old log-prob 0) and advantage."""
    logprobs = torch.tensor([[math.log(ratio)]])
    loss, _ = policy_loss(
        logprobs, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool),
        clip_low, clip_high, "token-mean", dual_clip=dual_clip,
    )  # fmt: skip
    return loss.item()


@pytest.mark.parametrize(
    ("ratio", "adv", "kwargs", "expected"),
    [
        (1.1, 1.0, {}, -1.1),  # inside the trust region
        (1.5, 1.0, {}, -1.28),  # A > 0: capped at 1 + clip_high
        (0.5, 1.0, {}, -0.5),  # A > 0: a low ratio is not clipped (pessimistic bound)
        (0.5, -1.0, {}, 0.8),  # A < 0: floored at 1 - clip_low
        (1.5, -1.0, {}, 1.5),  # A < 0: a high ratio is not clipped without dual clip
        (0.85, -1.0, {"clip_low": 0.1, "clip_high": 0.3}, 0.9),  # the low range alone decides the floor
        (1.25, 1.0, {"clip_low": 0.1, "clip_high": 0.3}, -1.25),  # ... and the high range alone the cap
        (1.25, 1.0, {"clip_low": 0.3, "clip_high": 0.1}, -1.1),
        (5.0, -2.0, {"dual_clip": 3.0}, 6.0),  # A < 0: bounded by -A * c
        (2.0, -2.0, {"dual_clip": 3.0}, 4.0),  # below c: untouched
        (5.0, 2.0, {"dual_clip": 3.0}, -2.56),  # A > 0: dual clip does not apply
    ],
)
def test_clipping_on_hand_made_ratios(ratio, adv, kwargs, expected):
    assert _token_loss(ratio, adv, **kwargs) == pytest.approx(expected, rel=1e-6)


def test_clip_metrics_count_each_side():
    ratios = torch.tensor([[1.5, 0.5, 1.0, 5.0, 0.5, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    _, metrics = policy_loss(ratios.log(), torch.zeros_like(ratios), adv, mask, 0.2, 0.28, "token-mean", 3.0)
    assert metrics["clip_fraction_high"] == pytest.approx(1 / 5)  # token 0
    assert metrics["clip_fraction_low"] == pytest.approx(1 / 5)  # token 1
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["dual_clip_fraction"] == pytest.approx(1 / 5)  # token 3
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 5.0 + 0.5) / 5)
    assert metrics["ratio_max"] == pytest.approx(5.0)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.0, 5.0, 0.5)) / 5
    assert metrics["approx_kl"] == pytest.approx(expected_kl)
    assert all(isinstance(v, float) for v in metrics.values())
    low = torch.tensor([[0.5, 0.7]])  # padding (ratio 1 once masked) must not raise ratio_max
    _, metrics = policy_loss(
        low.log(), torch.zeros(1, 2), torch.ones(1), torch.tensor([[1, 0]]), 0.2, 0.2, "token-mean"
    )
    assert metrics["ratio_max"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"clip_low": -0.1}, "clip_low"), ({"clip_low": 1.5}, "clip_low"), ({"clip_high": -1.0}, "clip_high"),
     ({"dual_clip": 1.0}, "dual_clip")],
)  # fmt: skip
def test_bad_clip_settings_name_the_key(kwargs, key):
    args = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": None} | kwargs
    with pytest.raises(ValueError, match=key):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), agg="token-mean", **args)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), torch.ones(2, 3), 0.2, 0.2, "token-mean")
    with pytest.raises(ValueError, match="is_weights"):
        policy_loss(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3), 0.2, 0.2, "token-mean",
            is_weights=torch.ones(2, 4),
        )  # fmt: skip


# ---------------------------------------------------------------- aggregation


def _random_batch(seed: int = 0, b: int = 5, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.6
    mask[0] = True
    mask[1] = False  # a response with no tokens at all
    return values, mask


def _reference_aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str) -> float:
    rows = [
        [v for v, m in zip(vr, mr, strict=True) if m] for vr, mr in zip(values.tolist(), mask.tolist(), strict=True)
    ]
    if agg == "token-mean":
        tokens = [v for row in rows for v in row]
        return sum(tokens) / len(tokens)
    if agg == "seq-mean-token-mean":
        means = [sum(row) / len(row) for row in rows if row]
        return sum(means) / len(means)
    assert agg == "seq-mean-token-sum-norm"
    return sum(sum(row) / values.shape[1] for row in rows) / len(rows)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_each_aggregation_equals_a_reference_loop(agg):
    values, mask = _random_batch()
    assert aggregate(values, mask, agg).item() == pytest.approx(_reference_aggregate(values, mask, agg), rel=1e-12)
    assert set(AGGREGATIONS.names()) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


def test_unknown_aggregation_lists_valid_names():
    with pytest.raises(ValueError, match="seq-mean-token-mean.*seq-mean-token-sum-norm"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "token-sum")


def test_duplicate_registration_is_an_error():
    registry: Registry = Registry("thing")
    registry.register("a")(lambda x: x)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda x: x)
    with pytest.raises(ValueError, match="already registered"):
        AGGREGATIONS.register("token-mean")(lambda v, m: v.sum())
    assert AGGREGATIONS.get("token-mean").__name__ == "_token_mean"


def test_masked_mean_of_nothing_is_zero_and_reduces_along_dim():
    assert masked_mean(torch.tensor([[-INF, 2.0]]), torch.tensor([[False, False]])).item() == 0.0
    rows = masked_mean(torch.tensor([[1.0, 3.0], [-INF, 4.0]]), torch.tensor([[1, 1], [0, 1]]), dim=-1)
    assert torch.equal(rows, torch.tensor([2.0, 4.0]))


# ---------------------------------------------------------------- gradients and masking


def test_unclipped_token_mean_gradient_is_minus_adv_ratio_over_tokens():
    values, mask = _random_batch(seed=1)
    old = values * 0.1
    logprobs = (old + 0.3 * torch.randn_like(old)).requires_grad_()
    adv = torch.randn(values.shape[0], dtype=torch.float64)
    # clip_low 1 floors the ratio at 0 and clip_high 100 caps it far away: nothing is clipped.
    loss, metrics = policy_loss(logprobs, old, adv, mask, 1.0, 100.0, "token-mean")
    loss.backward()
    ratio = (logprobs.detach() - old).exp()
    expected = torch.where(mask, -adv[:, None] * ratio / mask.sum(), 0.0)
    assert metrics["clip_fraction"] == 0.0
    assert torch.allclose(logprobs.grad, expected, atol=1e-12)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_masked_garbage_gives_finite_loss_and_zero_grads(agg, dual_clip):
    values, mask = _random_batch(seed=2)
    clean = torch.where(mask, values, 0.0)
    # Padding holds -inf in both log-prob tensors (-inf - -inf = NaN), or in one of them only.
    garbage_lp = torch.where(mask, values, -INF)
    garbage_old = torch.where(mask, values * 0.5, torch.tensor([-INF, 3.0]).repeat(7)[: values.shape[1]])
    adv = torch.where(mask, torch.ones_like(values), -INF)
    weights = torch.where(mask, torch.full_like(values, 0.5), INF)
    results = []
    for lp, old in ((clean, torch.where(mask, values * 0.5, 0.0)), (garbage_lp, garbage_old)):
        lp = lp.clone().requires_grad_()
        loss, metrics = policy_loss(lp, old, adv, mask, 0.2, 0.28, agg, dual_clip=dual_clip, is_weights=weights)
        loss.backward()
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
        assert torch.isfinite(lp.grad).all() and torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))
        results.append((loss.item(), lp.grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)  # garbage changes nothing
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_on_inf_padding_gives_finite_loss_and_grads(estimator):
    values, mask = _random_batch(seed=3)
    logprobs = torch.where(mask, values, -INF).requires_grad_()
    ref = torch.where(mask, values - 0.1, torch.tensor([-INF, 0.0, -5.0]).repeat(3)[: values.shape[1]])
    loss = aggregate(kl_penalty(logprobs, ref, estimator), mask, "token-mean")
    loss.backward()
    assert torch.isfinite(kl_penalty(logprobs, ref, estimator)).all()  # safe even for callers that multiply by mask
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert torch.equal(logprobs.grad[~mask], torch.zeros_like(logprobs.grad[~mask]))


def test_is_weights_multiply_the_per_token_loss():
    values, mask = _random_batch(seed=4)
    adv = torch.randn(values.shape[0], dtype=torch.float64)
    weights = torch.rand_like(values) * 2
    plain, _ = policy_loss(values, values, adv, mask, 0.2, 0.2, "seq-mean-token-mean")  # ratio 1: per-token -A
    weighted, metrics = policy_loss(values, values, adv, mask, 0.2, 0.2, "seq-mean-token-mean", is_weights=weights)
    expected = aggregate(-adv[:, None] * weights, mask, "seq-mean-token-mean")
    assert plain.item() == pytest.approx(aggregate(-adv[:, None].expand_as(values), mask, "seq-mean-token-mean").item())
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["is_weight_mean"] == pytest.approx(masked_mean(weights, mask).item())


# ---------------------------------------------------------------- KL, IS weights, entropy


def test_kl_estimators_match_closed_forms():
    values, _ = _random_batch(seed=5)
    # Seeded, and small enough that no token reaches the k3 cap (log-ratio below ~-2.5): with the global RNG's unit
    # normal noise, the order tests ran in decided whether one did.
    ref = values + 0.5 * torch.randn(values.shape, generator=torch.Generator().manual_seed(5), dtype=values.dtype)
    d = (values - ref).tolist()
    closed = {
        "k1": d,
        "k2": [[0.5 * x * x for x in row] for row in d],
        "k3": [[math.exp(-x) + x - 1 for x in row] for row in d],
    }
    for name, expected in closed.items():
        assert _allclose(kl_penalty(values, ref, name), expected, atol=1e-12), name
    assert (kl_penalty(values, ref, "k3") >= 0).all() and (kl_penalty(values, ref, "k2") >= 0).all()
    for name in KL_ESTIMATORS.names():
        assert torch.equal(kl_penalty(values, values, name), torch.zeros_like(values))


def test_k1_and_k3_are_unbiased_kl_estimates():
    # Tokens sampled from the policy p: E_p[k1] = E_p[k3] = KL(p || q); a sign slip in either breaks this.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[tokens][None], q.log()[tokens][None]
    for name in ("k1", "k3"):
        assert kl_penalty(logp, logq, name).mean().item() == pytest.approx(exact, rel=0.02), name


def test_k3_is_clamped_per_token_so_one_token_cannot_dominate():
    logprobs = torch.tensor([[-1000.0, 1000.0, -12.0, -1.0, 0.5]], requires_grad=True)
    out = kl_penalty(logprobs, torch.zeros(1, 5), "k3")
    # Far below the reference: exp(d) - d - 1 would be ~e^20 (or e^12), capped at 10 as in verl and OpenRLHF; far
    # above it k3 grows only linearly (1000 -> 19 after the log-ratio clamp), also capped; near it, untouched.
    assert out[0, :3].tolist() == [10.0, 10.0, 10.0]
    assert _allclose(out[0, 3:], [math.exp(1.0) - 2.0, math.exp(-0.5) - 0.5], atol=1e-6)
    out.sum().backward()
    assert logprobs.grad[0, :3].tolist() == [0.0, 0.0, 0.0] and (logprobs.grad[0, 3:] != 0).all()
    # One far-off token among 99 exact ones moves the mean KL by at most 10 / 100.
    row = torch.zeros(1, 100)
    row[0, 0] = -30.0
    assert masked_mean(kl_penalty(row, torch.zeros(1, 100), "k3"), torch.ones(1, 100)).item() == pytest.approx(0.1)


def test_unknown_kl_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_truncated_is_weights_are_capped_and_detached():
    old = torch.tensor([[0.0, 0.0, 2.0, -INF]], requires_grad=True)
    sampler = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0]])
    weights = truncated_is_weights(old, sampler, cap=2.0)
    assert _allclose(weights, [[1.0, 0.5, 2.0, 0.0]])
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, sampler, cap=0.0)


def test_entropy_matches_reference_and_survives_extreme_logits():
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy_from_logits(logits), expected, atol=1e-12)
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    extreme = torch.tensor([[[1e4, -1e4, 0.0, -INF, -INF]]], requires_grad=True)
    ent = entropy_from_logits(extreme)
    ent.sum().backward()
    assert ent.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(extreme.grad).all()
    half = torch.tensor([[[0.0, 0.0, -INF]]], requires_grad=True)
    entropy_from_logits(half).sum().backward()
    assert torch.isfinite(half.grad).all() and entropy_from_logits(half).item() == pytest.approx(math.log(2))
