"""G1's cold start, the parts a learner rank needs: SFT examples, their dataset on disk, the loss and the schedule.

A cold-start dataset is a directory that Hugging Face `datasets` loads as it is
(`load_dataset("parquet", data_dir=...)`, the board decoded as an `Image` feature)::

    <dir>/train.parquet        kept teacher responses, one row per state
    <dir>/validation.parquet   the held-out split (eval loss)
    <dir>/stats.json           how the rows were made: teacher, filter, kept and rejected counts by reason

Each row holds the board as PNG bytes (lossless: the learner sees the pixels the rollout engine saw), the game's
instructions (the chat template is applied on the learner, as the rollout actor applies it), the teacher's response
and the ground-truth board text. Pure torch and pyarrow: no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch import Tensor

from learner.grpo import masked_mean

SPLITS = ("train", "validation")
STATS_FILE = "stats.json"
# What `datasets` reads from a parquet file's schema metadata to type its columns (the board as an Image).
_HF_FEATURES = {
    "game": {"dtype": "string", "_type": "Value"},
    "state_id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "prompt": {"dtype": "string", "_type": "Value"},
    "response": {"dtype": "string", "_type": "Value"},
    "text_observation": {"dtype": "string", "_type": "Value"},
    "perception": {"dtype": "float64", "_type": "Value"},
    "game_reward": {"dtype": "float64", "_type": "Value"},
}


@dataclass(frozen=True)
class SFTExample:
    """One kept teacher response and the state it answers."""

    game: str
    state_id: str
    image: bytes  # the board as PNG
    prompt: str  # the game's instructions (the user turn's text, after the image)
    response: str  # the teacher's full answer (the supervised target)
    text_observation: str  # ground-truth board text
    perception: float  # the response's perception score (cells read right, or exact match)
    game_reward: float  # the action's shaped game reward

    def board(self) -> np.ndarray:
        """(H, W, 3) uint8, the frame as the game rendered it."""
        return np.asarray(Image.open(io.BytesIO(self.image)).convert("RGB"))


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(directory: str | Path, split: str, examples: list[SFTExample]) -> Path:
    """Writes one split as `<directory>/<split>.parquet` (the image as `datasets`' {bytes, path} struct)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    columns: dict[str, list[Any]] = {f.name: [getattr(e, f.name) for e in examples] for f in fields(SFTExample)}
    columns["image"] = [{"bytes": png, "path": None} for png in columns["image"]]
    table = pa.table(columns)
    metadata = {b"huggingface": json.dumps({"info": {"features": _HF_FEATURES}}).encode()}
    table = table.replace_schema_metadata(metadata)
    path = Path(directory) / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_split(directory: str | Path, split: str) -> list[SFTExample]:
    """The examples of `<directory>/<split>.parquet`.

    Raises:
        FileNotFoundError: naming the missing file (collect the dataset first: `launch/sft.py`).
    """
    path = Path(directory) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"cold-start dataset split {path} is missing; collect it with launch/sft.py")
    rows = pq.read_table(path).to_pylist()
    return [SFTExample(**{**row, "image": row["image"]["bytes"]}) for row in rows]


def write_stats(directory: str | Path, stats: dict[str, Any]) -> None:
    (Path(directory) / STATS_FILE).write_text(json.dumps(stats, indent=2, default=str))


def read_stats(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATS_FILE).read_text())


def example_dict(example: SFTExample) -> dict[str, Any]:
    """The example without its image (for logs and TensorBoard text)."""
    return {k: v for k, v in asdict(example).items() if k != "image"}


def sft_loss(logprobs: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the teacher's response tokens, averaged over tokens (as RL's token-mean).

    Args:
        logprobs: (B, T) log-probs of the target tokens under the policy (masked positions may hold -inf).
        mask: (B, T) true on real response tokens.

    Returns:
        The loss and `{"nll": ...}`.
    """
    nll = masked_mean(-logprobs, mask)
    return nll, {"nll": float(nll.detach())}


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up to `peak`, then cosine decay to
    `peak * min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
