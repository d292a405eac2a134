"""The token ids the policy may sample: the same mask in vLLM's sampler (`allowed_token_ids`) and the learner's softmax.

A random or young policy that samples `<|image_pad|>` or `<|vision_start|>` poisons the next forward pass (vLLM expects
image features for every image pad), and the embedding rows past the tokenizer's end (padding to a round size) decode
to nothing. Both are masked: the policy is a distribution over text tokens, the tags and `<|im_end|>` only.
"""

from __future__ import annotations

# The one special token a response may end with; every other special token is the prompt's business.
END_OF_TURN = "<|im_end|>"


def allowed_token_ids(tokenizer) -> list[int]:
    """Every id the policy may sample, ascending: all non-special tokens (the tags included) and `<|im_end|>`.

    Args:
        tokenizer: a Hugging Face tokenizer (the engine's or the processor's).

    Returns:
        Sorted ids in [0, len(tokenizer)); ids past the tokenizer's end (embedding padding) are never included.

    Raises:
        ValueError: when the tokenizer has no `<|im_end|>` (not a Qwen chat tokenizer).
    """
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {END_OF_TURN!r} token; a Qwen2-VL chat tokenizer is required")
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} - {end}
    return [i for i in range(len(tokenizer)) if i not in special]
