"""The learner's vision attention (one padded SDPA call per layer) against transformers' own loop over windows.

On real boards at Qwen2.5-VL's own pixel cap: a Tetris and a 2048 board of different sizes in one batch, so the
windowed layers see full and partial windows and the full-attention layers two images of unequal length.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import envs
from actors.tiny_model import QWEN_MAX_PIXELS, set_pixel_cap
from learner import vision_attention


@pytest.fixture(scope="module")
def boards(tiny_model_dir, tmp_path_factory):
    """(pixel_values, image_grid_thw) of two real boards, processed as the learner processes them at Qwen's cap."""
    model_dir = tmp_path_factory.mktemp("qwen_cap") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    set_pixel_cap(model_dir, QWEN_MAX_PIXELS)
    processor = AutoProcessor.from_pretrained(model_dir)
    sizes = {"tetris": (644, 840), "2048": (500, 400)}  # (width, height): the default, and one of partial windows
    images = [Image.fromarray(envs.make(name, seed=1, image_size=size).render_array()) for name, size in sizes.items()]
    batch = processor.image_processor(images=images, return_tensors="pt")
    return batch["pixel_values"], batch["image_grid_thw"]


def _vision_output_and_grads(model_dir, boards, implementation: str | None):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    if implementation is not None:
        model.model.visual.config._attn_implementation = implementation
    pixel_values, grid = boards
    pixel_values = pixel_values.clone().requires_grad_(True)
    out = model.model.visual(pixel_values, grid_thw=grid).pooler_output  # (merged tokens, hidden)
    out.pow(2).sum().backward()
    qkv = model.model.visual.blocks[0].attn.qkv.weight.grad  # a windowed block's attention weights
    return out.detach(), pixel_values.grad, qkv


def test_padded_window_attention_equals_transformers_loop_over_windows(tiny_model_dir, boards):
    pixel_values, grid = boards
    assert grid[:, 1:].prod(dim=1).tolist() != [int(grid[0, 1:].prod())] * 2  # two images of unequal size
    out_loop, dpix_loop, dqkv_loop = _vision_output_and_grads(tiny_model_dir, boards, None)  # transformers' sdpa
    out, dpix, dqkv = _vision_output_and_grads(tiny_model_dir, boards, vision_attention.NAME)

    assert out.shape[0] == int(grid.prod(dim=1).sum()) // 4  # every patch, merged 2 x 2
    torch.testing.assert_close(out, out_loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpix, dpix_loop, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dqkv, dqkv_loop, rtol=1e-4, atol=1e-6)


def test_padded_window_attention_keeps_windows_apart():
    """Each window attends to itself alone: changing one window's keys leaves every other window's output as it was."""
    torch.manual_seed(0)
    heads, dim, lengths = 2, 8, [5, 64, 17, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(1, heads, sum(lengths), dim) for _ in range(3))
    out, _ = vision_attention.padded_window_attention(None, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu)

    for w, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):  # each window alone
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], scale=dim**-0.5
        )
        torch.testing.assert_close(out[0, start:end], alone[0].transpose(0, 1), msg=f"window {w}")
    k2 = k.clone()
    k2[:, :, 5:69] += 1.0  # window 1's keys only
    out2, _ = vision_attention.padded_window_attention(None, q, k2, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu)
    assert not torch.allclose(out2[0, 5:69], out[0, 5:69])
    torch.testing.assert_close(out2[0, :5], out[0, :5])
    torch.testing.assert_close(out2[0, 69:], out[0, 69:])

    with pytest.raises(ValueError, match="cu_seqlens"):
        vision_attention.padded_window_attention(None, q, k, v, None)
