"""Batch building: advantages per group, and that `index` picks exactly the logits that predict each response token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from learner.batch import collate, encode_groups, padded_tokens, split_by_tokens


def test_samples_carry_group_advantages_and_sampler_logprobs(processor, make_groups):
    groups = make_groups(3, seed=0)
    samples, images = encode_groups(groups, processor, normalize_std=True, eps=1e-6)
    assert len(images) == 3 and len(samples) == 12
    advantages = torch.tensor([s.advantage for s in samples]).view(3, 4)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(advantages.std(dim=1), torch.ones(3), atol=1e-4)
    assert samples[5].response_ids.tolist() == groups[1].response_ids[1]
    assert samples[5].sampler_logprobs.tolist() == pytest.approx(groups[1].response_logprobs[1])


def test_index_selects_the_positions_that_predict_each_response_token(processor, make_groups):
    samples, images = encode_groups(make_groups(3, seed=1), processor, normalize_std=True, eps=1e-6)
    picked = [samples[0], samples[5], samples[10]]  # three groups: different prompt and response lengths
    response_len = max(s.response_len for s in picked) + 3
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mb = collate(
        picked, images, response_len, pad_id=0, filler_id=7, image_token_id=image_pad, device=torch.device("cpu")
    )
    # A "model" whose logits at position p are the one-hot of the true next input token: the gathered logits must
    # then name each response token exactly, wherever the sample's prompt ends.
    vocab = int(mb.input_ids.max()) + 1
    next_tokens = torch.roll(mb.input_ids, -1, dims=1)[:, mb.keep]  # (B, K)
    logits = torch.nn.functional.one_hot(next_tokens, vocab).float()  # (B, K, V)
    gathered = logits.gather(1, mb.index[..., None].expand(-1, -1, vocab)).argmax(-1)  # (B, T)
    assert torch.equal(gathered[mb.mask], mb.targets[mb.mask])
    assert mb.mask.sum(dim=1).tolist() == [s.response_len for s in picked]
    assert (mb.targets[~mb.mask] == 7).all()  # padding targets hold the allowed filler id, never a banned id
    assert mb.pixel_values.shape[0] == int(mb.image_grid_thw.prod(dim=1).sum())
    assert mb.sampler_logprobs.shape == (3, response_len) and mb.old_logprobs is None
    # The image tokens, and only they, select Qwen2.5-VL's 3-D positions: one image's worth per sample.
    tokens_per_image = (mb.image_grid_thw.prod(dim=1) // processor.image_processor.merge_size**2).tolist()
    assert mb.mm_token_type_ids.sum(dim=1).tolist() == [tokens_per_image[i] for i in mb.sample_image]
    assert torch.equal(mb.mm_token_type_ids.bool(), mb.input_ids == image_pad)


def test_a_micro_batch_carries_each_board_once_and_maps_every_sample_to_its_own(processor, make_groups):
    groups = make_groups(3, seed=3)  # boards of three sizes, of two image-token counts
    samples, images = encode_groups(groups, processor, normalize_std=True, eps=1e-6)
    picked = [samples[1], samples[6], samples[0], samples[7], samples[9]]  # groups 0, 1, 0, 1, 2
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mb = collate(picked, images, 16, pad_id=0, filler_id=7, image_token_id=image_pad, device=torch.device("cpu"))
    assert mb.sample_image == [0, 1, 0, 1, 2]
    assert torch.equal(
        mb.image_grid_thw, torch.cat([images[0].image_grid_thw, images[1].image_grid_thw, images[2].image_grid_thw])
    )
    assert torch.equal(mb.pixel_values, torch.cat([images[i].pixel_values for i in range(3)]))
    # Each sample's image tokens are as many as its own board gives (the boards differ in size).
    merge = processor.image_processor.merge_size
    own = [int(images[s.image].image_grid_thw.prod()) // merge**2 for s in picked]
    assert mb.mm_token_type_ids.sum(dim=1).tolist() == own and len(set(own)) == 2


def test_prompt_image_mismatch_is_rejected(processor, make_groups):
    group = make_groups(1, seed=2)[0]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    cut = dataclasses.replace(group, prompt_ids=[t for t in group.prompt_ids if t != pad][:-1] + [pad])
    with pytest.raises(ValueError, match="prompt has 1 image pads but the image gives"):
        encode_groups([cut], processor, normalize_std=True, eps=1e-6)


def test_split_by_tokens_packs_consecutive_samples_within_the_budget():
    lengths = [300, 250, 1200, 100, 120, 90, 700, 80]  # prompt + response tokens, as a rank's samples
    runs = split_by_tokens(lengths, budget=600)
    assert runs == [[0, 1], [2], [3, 4, 5], [6], [7]]  # 1200 and 700 exceed the budget alone: one sample each
    assert all(padded_tokens(run, lengths) <= 600 for run in runs if len(run) > 1)

    # Forced to more runs (another rank needs 7): the fullest runs are halved, order and coverage kept.
    forced = split_by_tokens(lengths, budget=600, count=7)
    assert len(forced) == 7 and [i for run in forced for i in run] == list(range(8))
    assert max(padded_tokens(run, lengths) for run in forced if len(run) > 1) <= 360
    assert split_by_tokens(lengths, budget=10_000) == [list(range(8))]
    with pytest.raises(ValueError, match="into 9 runs"):
        split_by_tokens(lengths, budget=600, count=9)
