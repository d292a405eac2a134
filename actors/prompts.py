"""The chat prompt for one game state: the game's instructions after its board image, in the model's own template.

The text goes through the tokenizer's chat template (Qwen2-VL's for every model here), which writes the image as
`<|vision_start|><|image_pad|><|vision_end|>`; vLLM's processor expands that one pad into as many as the resized board
has patches, so the token ids the engine reports back (`RequestOutput.prompt_token_ids`) are the expanded ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def chat_prompt(tokenizer, instructions: str) -> str:
    """The templated prompt text (image placeholder, then `instructions`), ending where the assistant's turn starts.

    Args:
        tokenizer: the model's tokenizer; its `chat_template` is used.
        instructions: the game's prompt (rules, action format, the tag convention).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template: the model directory lacks chat_template.jinja")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instructions}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def engine_input(prompt_text: str, image: np.ndarray) -> dict[str, Any]:
    """vLLM's prompt dict for one state.

    Args:
        prompt_text: from `chat_prompt`.
        image: (H, W, 3) uint8 board, as the game rendered it.
    """
    return {"prompt": prompt_text, "multi_modal_data": {"image": Image.fromarray(image)}}
