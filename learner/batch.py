"""From trajectory groups to model inputs: samples with advantages, then padded micro-batches.

Pure torch plus the model directory's image processor; no DeepSpeed, so it is tested and read on its own. The image of
a group is processed once and shared by its G samples, and a micro-batch carries each of its images once: the learner
encodes them once per pass and gives every sample its image's features (`MicroBatch.sample_image`), where a
transformers forward on per-sample pixels would run the vision tower G times on the same board.

Layout of one sample: `input_ids = prompt_ids + response_ids`. The logits at position `P - 1 + t` predict response
token `t`, so a micro-batch asks the model for the logits of positions `keep` only (the span covering every response
of the micro-batch) and `index` picks each sample's positions out of that span.

Positions: vLLM samples with Qwen2.5-VL's multimodal RoPE (image tokens at (t, h, w) grid positions, the text after
them shifted accordingly). Transformers builds those positions only when the forward gets `mm_token_type_ids` (1 on
image tokens); without them every axis counts 0, 1, 2, ... and the learner scores a differently positioned model.
`collate` therefore always fills `mm_token_type_ids`; the model's `get_rope_index` skips right padding through the
attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from actors.prompts import chat_prompt
from learner.grpo import group_advantages
from learner.sft import SFTExample
from replay.trajectory import TrajectoryGroup


@dataclass
class ImageInputs:
    """One group's image, processed once."""

    pixel_values: torch.Tensor  # (patches, channels * temporal_patch * patch * patch)
    image_grid_thw: torch.Tensor  # (1, 3)


@dataclass
class Sample:
    """One response of one group: what the loss needs per sequence."""

    image: int  # index into the list of ImageInputs
    prompt_ids: list[int]  # (P,)
    response_ids: torch.Tensor  # (T,) int64
    sampler_logprobs: torch.Tensor  # (T,) float32, the vLLM sampler's log-probs
    advantage: float
    old_logprobs: torch.Tensor | None = None  # (T,) learner log-probs before the update (when precomputed)
    ref_logprobs: torch.Tensor | None = None  # (T,) reference-model log-probs (when kl_coef > 0)

    @property
    def response_len(self) -> int:
        return int(self.response_ids.numel())


@dataclass
class MicroBatch:
    """Padded tensors of a few samples, on the learner's device."""

    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    mm_token_type_ids: torch.Tensor  # (B, L) int32: 1 on image tokens, 0 elsewhere (selects the 3-D positions)
    pixel_values: torch.Tensor  # (patches of the distinct images, D)
    image_grid_thw: torch.Tensor  # (I, 3): the micro-batch's distinct images, in the order of their first sample
    sample_image: list[int]  # (B,) each sample's image, an index into image_grid_thw
    keep: torch.Tensor  # (K,) positions whose logits are computed
    index: torch.Tensor  # (B, T) position in `keep` of the logits predicting each response token
    targets: torch.Tensor  # (B, T) response ids; padding replaced by an allowed id (never -inf in a gather)
    mask: torch.Tensor  # (B, T) bool, true on real response tokens
    sampler_logprobs: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T)
    ref_logprobs: torch.Tensor | None  # (B, T)


def encode_groups(
    groups: list[TrajectoryGroup], processor, normalize_std: bool, eps: float, unbiased_std: bool = True
) -> tuple[list[Sample], list[ImageInputs]]:
    """Processes each group's image once and turns its G responses into samples with group-relative advantages.

    Args:
        groups: trajectory groups (this rank's share of the batch).
        processor: the model directory's processor (its image processor and tokenizer are used).
        normalize_std: GRPO (True) or Dr.GRPO (False) advantages.
        eps: added to the group std.
        unbiased_std: the unbiased group std (ddof 1) rather than the population std (see `group_advantages`).

    Raises:
        ValueError: when a prompt's image-pad count does not match the processed image (the actor and the learner
            processed the board differently), or responses and log-probs disagree in length.
    """
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    samples: list[Sample] = []
    images: list[ImageInputs] = []
    for group in groups:
        out = processor.image_processor(images=[Image.fromarray(np.asarray(group.image))], return_tensors="pt")
        grid = out["image_grid_thw"]  # (1, 3)
        expected = int(grid.prod()) // merge**2
        found = sum(1 for t in group.prompt_ids if t == image_pad)
        if found != expected:
            raise ValueError(
                f"group {group.state_id}: prompt has {found} image pads but the image gives {expected} tokens; "
                "the actor's engine and the learner must use the same processor (model directory)"
            )
        images.append(ImageInputs(out["pixel_values"], grid))
        rewards = torch.from_numpy(group.total_rewards())[None]  # (1, G)
        advantages = group_advantages(rewards, normalize_std, eps, unbiased_std)[0]  # (G,)
        for ids, logprobs, adv in zip(group.response_ids, group.response_logprobs, advantages.tolist(), strict=True):
            if len(ids) != len(logprobs):
                raise ValueError(f"group {group.state_id}: {len(ids)} response ids but {len(logprobs)} log-probs")
            samples.append(
                Sample(
                    image=len(images) - 1,
                    prompt_ids=list(group.prompt_ids),
                    response_ids=torch.tensor(ids, dtype=torch.long),
                    sampler_logprobs=torch.tensor(logprobs, dtype=torch.float32),
                    advantage=adv,
                )
            )
    return samples, images


def _pad(rows: list[torch.Tensor], length: int, value: float | int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def split_by_tokens(lengths: list[int], budget: int, count: int | None = None) -> list[list[int]]:
    """Consecutive runs of sample indices whose padded size (samples x the longest) stays within `budget` tokens.

    In order, because the loss and the precomputed log-probs follow the samples' order; a sample longer than the
    budget goes alone. With `count` the fullest run with two samples or more is halved until there are `count` runs:
    every rank of a ZeRO-3 world must run as many forwards.

    Args:
        lengths: (N,) each sample's sequence length (prompt + response).
        budget: the most padded tokens a micro-batch holds, unless one sample alone is longer.
        count: how many runs to return, from the greedy number up to N; None: the greedy number.

    Returns:
        The runs, each a list of consecutive indices, together covering 0..N-1.
    """
    runs: list[list[int]] = []
    for i in range(len(lengths)):
        if runs and padded_tokens([*runs[-1], i], lengths) <= budget:
            runs[-1].append(i)
        else:
            runs.append([i])
    if count is not None:
        if not len(runs) <= count <= len(lengths):
            raise ValueError(f"cannot split {len(lengths)} samples into {count} runs (at least {len(runs)})")
        while len(runs) < count:
            k = max((k for k, run in enumerate(runs) if len(run) > 1), key=lambda k: padded_tokens(runs[k], lengths))
            half = len(runs[k]) // 2
            runs[k : k + 1] = [runs[k][:half], runs[k][half:]]
    return runs


def padded_tokens(run: list[int], lengths: list[int]) -> int:
    """The tokens a micro-batch of the samples `run` takes, padding included."""
    return len(run) * max(lengths[j] for j in run)


def collate(
    samples: list[Sample],
    images: list[ImageInputs],
    response_len: int,
    pad_id: int,
    filler_id: int,
    image_token_id: int,
    device: torch.device,
) -> MicroBatch:
    """Pads a few samples into one micro-batch, with each of their images once.

    Args:
        samples: the micro-batch's samples.
        images: every group's processed image (indexed by `Sample.image`).
        response_len: T of the loss tensors, >= every sample's response length; the same T on every micro-batch
            and rank keeps Dr.GRPO's constant normaliser constant.
        pad_id: input padding id (masked out by the attention mask).
        filler_id: an allowed token id written where targets are padding, so the gather never reads a -inf logit.
        image_token_id: the `<|image_pad|>` id (`config.image_token_id`); responses never hold it (actors/vocab.py).
        device: where the tensors go.
    """
    prompt_lens = [len(s.prompt_ids) for s in samples]
    seqs = [torch.tensor(s.prompt_ids + s.response_ids.tolist(), dtype=torch.long) for s in samples]
    length = max(len(s) for s in seqs)
    input_ids = _pad(seqs, length, pad_id, torch.long)  # (B, L)
    attention_mask = _pad([torch.ones(len(s), dtype=torch.long) for s in seqs], length, 0, torch.long)  # (B, L)

    lo = min(prompt_lens) - 1
    hi = max(p + s.response_len for p, s in zip(prompt_lens, samples, strict=True)) - 1  # exclusive
    keep = torch.arange(lo, max(hi, lo + 1))  # (K,)
    steps = torch.arange(response_len)  # (T,)
    index = (torch.tensor(prompt_lens)[:, None] - 1 - lo + steps).clamp(max=keep.numel() - 1)  # (B, T)
    mask = steps[None, :] < torch.tensor([s.response_len for s in samples])[:, None]  # (B, T)
    targets = _pad([s.response_ids for s in samples], response_len, filler_id, torch.long)  # (B, T)

    def stack(name: str) -> torch.Tensor | None:
        rows = [getattr(s, name) for s in samples]
        return None if rows[0] is None else _pad(rows, response_len, 0.0, torch.float32).to(device)

    distinct = list(dict.fromkeys(s.image for s in samples))  # (I,) indices into `images`, first use first
    return MicroBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        mm_token_type_ids=(input_ids == image_token_id).to(device, torch.int32),
        pixel_values=torch.cat([images[i].pixel_values for i in distinct]).to(device),
        image_grid_thw=torch.cat([images[i].image_grid_thw for i in distinct]).to(device),
        sample_image=[distinct.index(s.image) for s in samples],
        keep=keep.to(device),
        index=index.to(device),
        targets=targets.to(device),
        mask=mask.to(device),
        sampler_logprobs=stack("sampler_logprobs"),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        old_logprobs=stack("old_logprobs"),
        ref_logprobs=stack("ref_logprobs"),
    )


def encode_sft(examples: list[SFTExample], processor) -> tuple[list[Sample], list[ImageInputs]]:
    """Cold-start examples as samples: the prompt exactly as a rollout engine sees it, the teacher's answer as target.

    The prompt is the rollout actor's chat prompt (`actors.prompts.chat_prompt`) with its image pad expanded by the
    processor, as vLLM's processor expands it; the target is the response's tokens plus `<|im_end|>`, which ends
    every sampled response that stops. Advantages and sampler log-probs are unused (zero).

    Args:
        examples: this rank's share of the batch.
        processor: the model directory's processor.
    """
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples: list[Sample] = []
    images: list[ImageInputs] = []
    for example in examples:
        text = chat_prompt(tokenizer, example.prompt)
        out = processor(text=[text], images=[Image.fromarray(example.board())], return_tensors="pt")
        images.append(ImageInputs(out["pixel_values"], out["image_grid_thw"]))
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [end_of_turn]
        samples.append(
            Sample(
                image=len(images) - 1,
                prompt_ids=out["input_ids"][0].tolist(),
                response_ids=torch.tensor(response, dtype=torch.long),
                sampler_logprobs=torch.zeros(len(response)),
                advantage=0.0,
            )
        )
    return samples, images
