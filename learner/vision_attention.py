"""The vision tower's windowed attention as one SDPA call per layer, not one per window.

Qwen2.5-VL's vision tower attends within 112-pixel windows (28 of the 3B's 32 blocks) and over whole images in the
others. transformers runs every attention implementation but flash-attention as a Python loop over the windows: a
644 x 840 board has 48 windows, so a micro-batch of two boards costs ~2,700 SDPA calls per forward and a GRPO update
of 16 samples ~65,000, each with its autograd and checkpoint hooks. On an H200 that update was CPU-bound: 25-33 s for
16 samples of ~1,050 tokens on a 3B-shaped model (bench/learner_step.py). flash-attention takes the window boundaries
(`cu_seqlens`) in one call, but it has no wheel for the pinned torch and no hub here. This implementation takes the
same `cu_seqlens` and runs the same attention in one SDPA call over the windows padded to the longest, the padding
masked out of the keys: the same math on CPU and GPU, in ~1/100 of the calls.

transformers passes `cu_seqlens` only to an implementation whose name says "flash" (`is_flash_attention_requested`),
hence the registered name. The learner sets it on the vision config alone; the language model keeps SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "flash_padded_sdpa"


def padded_window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each of the sequences that `cu_seq_lens_q` cuts the packed tokens into.

    Args:
        module: the attention module (unused; the interface passes it).
        query, key, value: (1, H, N, D) packed tokens of all windows (or images), one after another.
        attention_mask: must be None: the boundaries are the only mask.
        scaling: the softmax scale.
        dropout: attention dropout probability.
        cu_seq_lens_q: (W + 1,) cumulative window lengths, from 0 to N (the same for keys).
        max_length_q: the longest window (computed when None).

    Returns:
        (1, N, H, D) attention output, as transformers' implementations return it, and no weights.
    """
    if cu_seq_lens_q is None or attention_mask is not None:
        raise ValueError(f"attention {NAME!r} is for the vision tower's packed windows: it needs cu_seqlens, no mask")
    cu = cu_seq_lens_q.long()
    lengths = cu[1:] - cu[:-1]  # (W,)
    tokens, windows = query.shape[2], lengths.shape[0]
    longest = int(max_length_q) if max_length_q is not None else int(lengths.max())
    arange = torch.arange(tokens, device=query.device)  # windows and longest are both <= tokens
    window = torch.repeat_interleave(arange[:windows], lengths, output_size=tokens)  # (N,) each token's window
    offset = arange - cu[window]  # (N,) its place in that window

    def padded(x: torch.Tensor) -> torch.Tensor:  # (1, H, N, D) -> (W, H, L, D)
        out = x.new_zeros(windows, longest, x.shape[1], x.shape[3])
        out[window, offset] = x[0].transpose(0, 1)
        return out.transpose(1, 2)

    keep = arange[:longest] < lengths[:, None]  # (W, L): the keys that are tokens, not padding
    out = F.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), attn_mask=keep[:, None, None, :], dropout_p=dropout, scale=scaling
    )  # (W, H, L, D)
    return out.transpose(1, 2)[window, offset].unsqueeze(0), None


AttentionInterface.register(NAME, padded_window_attention)
