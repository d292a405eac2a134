"""The DeepSpeed ZeRO-3 learner group on CPU: sharded steps, NaN skips, checkpoints and exact resume.

The groups are sampled by the real vLLM engine from the learners' initial weights (`sampled_groups`), so the importance
weights start at 1 and the policy term, not only the KL and entropy terms, drives the steps.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import ray
import torch

from learner import GRPOConfig, checkpoint
from learner.batch import split_by_tokens


def _delta(before: dict, after: dict) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)])


def _assert_same_step(one, two, groups, steps: int) -> dict[str, float]:
    """Runs the same update on a 1-rank and a 2-rank group that start from the same weights; returns the 2-rank
    group's metrics after checking that both moved the weights alike and report the same figures."""
    before = one.consolidated_state_dict()
    assert all(torch.equal(before[k], v) for k, v in two.consolidated_state_dict().items())
    metrics_1, metrics_2 = one.update(groups), two.update(groups)
    delta_1 = _delta(before, one.consolidated_state_dict())
    delta_2 = _delta(before, two.consolidated_state_dict())
    assert delta_1.abs().max() > 1e-3  # the step did move the weights (lr 1e-2, Adam)
    assert (delta_1 - delta_2).norm() / delta_1.norm() < 1e-3
    assert metrics_1["optim/steps"] == metrics_2["optim/steps"] == steps
    keys = ("loss/policy", "policy/entropy", "optim/grad_norm", "policy/clip_fraction", "policy/is_mean")
    for key in (*keys, "policy/is_max", "policy/is_truncated_share"):
        assert metrics_1[key] == pytest.approx(metrics_2[key], rel=1e-4, abs=1e-6), key
    assert all(np.isfinite(v) for v in metrics_2.values())
    return metrics_2


def test_two_rank_step_changes_weights_as_one_rank_step(learners_1, learners_2, reset_learners, sampled_groups):
    # Both groups start from the model directory's weights; each runs the same update (2 minibatches, micro-batches
    # of 3, old log-probs precomputed) on the same 4 groups, split over 2 ranks in one case.
    reset_learners(learners_1, learners_2)
    metrics = _assert_same_step(learners_1, learners_2, sampled_groups(4, seed=10), steps=2)
    # The learner scores the sampled tokens as vLLM did (same weights, positions, mask): importance weights of 1.
    assert metrics["policy/logprob_diff"] < 1e-5
    assert metrics["policy/is_mean"] == pytest.approx(1.0, abs=1e-5) and metrics["policy/is_max"] < 1 + 1e-4
    assert metrics["policy/is_truncated_share"] == 0 and metrics["optim/lr"] == pytest.approx(1e-2)
    assert metrics["loss/kl"] > 0  # the second minibatch's policy has moved away from the reference


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_rank_seq_mean_epochs_and_dual_clip_step_as_one_rank(new_learner_group, sampled_groups, loss_agg):
    # Sequence-level aggregation (each rank's sequences weigh by the whole batch's count, Dr.GRPO's constant
    # normaliser), two passes over the batch (old log-probs precomputed once, is weights from the first pass) and the
    # dual clip: 4 optimizer steps that must move the weights as one rank does.
    grpo = GRPOConfig(loss_agg=loss_agg, ppo_epochs=2, num_minibatches=2, dual_clip=3.0, is_cap=2.0, kl_coef=1e-2)
    groups = [new_learner_group(num, grpo=grpo, max_response_len=16) for num in (1, 2)]
    try:
        metrics = _assert_same_step(*groups, sampled_groups(4, seed=50), steps=4)
    finally:
        for group in groups:
            group.shutdown()
    assert metrics["policy/logprob_diff"] < 1e-5 and metrics["loss/kl"] > 0


def test_micro_batches_packed_by_tokens_step_as_micro_batches_by_count(
    learners_1, reset_learners, new_learner_group, sampled_groups
):
    # learner.micro_batch_tokens: each rank packs its samples by size, and the two ranks need different numbers of
    # micro-batches; they must agree on one (ZeRO-3's forwards are collective) and step as one rank does by count.
    groups = sampled_groups(4, seed=60)

    def greedy_count(rank: int, budget: int) -> int:  # micro-batches rank `rank` alone would make of its samples
        lengths = [len(g.prompt_ids) + len(r) for g in groups[rank::2] for r in g.response_ids]
        return len(split_by_tokens(lengths, budget))

    longest = max(len(g.prompt_ids) + len(r) for g in groups for r in g.response_ids)
    budget = next(b for b in range(longest, 8 * longest) if greedy_count(0, b) != greedy_count(1, b))
    reset_learners(learners_1)  # micro-batches of 3 sequences
    packed = new_learner_group(2, micro_batch_tokens=budget)
    try:
        _assert_same_step(learners_1, packed, groups, steps=2)
    finally:
        packed.shutdown()


def test_non_finite_batch_skips_the_step_and_training_goes_on(learners_2, sampled_groups):
    poisoned = sampled_groups(2, seed=20)
    poisoned[0] = dataclasses.replace(
        poisoned[0], response_logprobs=[[float("nan")] * len(r) for r in poisoned[0].response_ids]
    )
    before = learners_2.consolidated_state_dict()
    metrics = learners_2.update(poisoned)  # rank 0's both minibatches hold NaN importance weights
    assert metrics["optim/skipped_steps"] == 2 and metrics["optim/steps"] == 0
    after = learners_2.consolidated_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Refs, as the buffer hands them out: each rank pulls its own groups from the object store.
    healthy = learners_2.update([ray.put(g) for g in sampled_groups(2, seed=21)])
    assert healthy["optim/skipped_steps"] == 0 and healthy["optim/steps"] == 2
    final = learners_2.consolidated_state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert not all(torch.equal(after[k], final[k]) for k in after)


def test_resume_continues_with_identical_weights_and_step(learners_2, sampled_groups, tmp_path, tiny_model_dir):
    learners_2.update(sampled_groups(2, seed=30))
    path = learners_2.save_checkpoint(str(tmp_path), {"learner": {"lr": 1e-2}}, keep_last=2)
    saved = learners_2.consolidated_state_dict()
    state = checkpoint.read_state(path)
    assert (
        checkpoint.latest(tmp_path) == tmp_path / f"step-{state['step']:08d}"
        and str(checkpoint.latest(tmp_path)) == path
    )
    assert json.loads((tmp_path / path / checkpoint.RUN_CONFIG_FILE).read_text()) == {"learner": {"lr": 1e-2}}

    # Continue, then go back to the checkpoint and redo the same update: Adam's moments, the step and the lr
    # schedule must all be restored for the second run to land on bit-identical weights.
    batch = sampled_groups(2, seed=31)
    learners_2.update(batch)
    continued = learners_2.consolidated_state_dict()
    restored = learners_2.load_checkpoint(path)
    assert restored["step"] == state["step"]
    assert all(torch.equal(saved[k], v) for k, v in learners_2.consolidated_state_dict().items())
    learners_2.update(batch)
    assert all(torch.equal(continued[k], v) for k, v in learners_2.consolidated_state_dict().items())

    # The Hugging Face copy loads as it is, with the learner's weights and the model directory's processor files.
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{path}/{checkpoint.HF_DIR}", dtype=torch.float32)
    loaded = model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert (
        AutoProcessor.from_pretrained(f"{path}/{checkpoint.HF_DIR}").tokenizer.get_vocab()
        == AutoProcessor.from_pretrained(tiny_model_dir).tokenizer.get_vocab()
    )


def test_uneven_or_empty_batch_is_rejected(learners_2, sampled_groups):
    with pytest.raises(ValueError, match="3 groups cannot be split evenly"):
        learners_2.update(sampled_groups(3, seed=40))
    with pytest.raises(ValueError, match="0 groups cannot be split evenly"):
        learners_2.update([])
