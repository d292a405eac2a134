"""What a user watches: TensorBoard scalars and sample boards, a progress bar, and one summary line per step.

Metrics of the rollout actors are reduced with RLlib's MetricsLogger (mean over the rounds of a step, as RLlib reduces
its EnvRunners' metrics); every tag is listed in the README's "Monitoring" table.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from replay.trajectory import TrajectoryGroup

# Window large enough that a step's values are all kept: the reduction is the plain mean over the step.
_WHOLE_STEP = 10**9


def reduce_rounds(round_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each tag over the rounds of a step (several actors, possibly several rounds each)."""
    step_logger = MetricsLogger(root=True)
    for metrics in round_metrics:
        step_logger.log_dict(metrics, reduce="mean", window=_WHOLE_STEP)
    return {key: float(value) for key, value in step_logger.compile().items()} if round_metrics else {}


def sample_image(group: TrajectoryGroup, index: int = 0, width: int = 448) -> np.ndarray:
    """The board the model saw beside one of its responses and that response's rewards, as an (H, W, 3) array."""
    board = Image.fromarray(group.image)
    board = board.resize((width, max(1, round(board.height * width / board.width))))
    reward = group.rewards[index]
    header = (
        f"{group.game} v{group.policy_version}  total {reward.total:+.2f}  game {reward.game:+.2f}  "
        f"format {reward.format:.2f}  perception {reward.perception:.2f}"
    )
    body = group.response_texts[index][:1200]
    lines = [header, ""] + [part for line in body.splitlines() or [""] for part in textwrap.wrap(line, 60) or [""]]
    font = ImageFont.load_default(size=14)
    panel = Image.new("RGB", (width, board.height), "white")
    ImageDraw.Draw(panel).multiline_text((8, 8), "\n".join(lines[: board.height // 18]), fill="black", font=font)
    canvas = Image.new("RGB", (2 * width, board.height), "white")
    canvas.paste(board, (0, 0))
    canvas.paste(panel, (width, 0))
    return np.asarray(canvas)


class Monitor:
    """TensorBoard writer, progress bar and per-step console line of one run.

    Args:
        output_dir: the run's directory; event files go to `<output_dir>/tensorboard`.
        config: the resolved config (shown as text in TensorBoard).
        total_steps: learner updates of the run.
        start_step: the first step (non-zero after a resume).
    """

    def __init__(self, output_dir: str | Path, config: dict[str, Any], total_steps: int, start_step: int = 0):
        self.log_dir = Path(output_dir) / "tensorboard"
        # After a resume, events of steps past the checkpoint (written before the run was killed) are dropped.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Writes every scalar at `step` and prints the step's summary line."""
        for key, value in sorted(metrics.items()):
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.bar.update(1)
        self.bar.set_postfix(
            reward=f"{metrics.get('reward/total', float('nan')):.3f}",
            step_s=f"{metrics.get('perf/step_s', float('nan')):.1f}",
        )
        self.bar.write(
            f"step {step:>5}  reward {metrics.get('reward/total', float('nan')):+.3f} "
            f"(format {metrics.get('reward/format', float('nan')):.3f}, "
            f"game {metrics.get('reward/game', float('nan')):+.3f}, "
            f"perception {metrics.get('reward/perception', float('nan')):.3f})  "
            f"loss {metrics.get('loss/policy', float('nan')):+.4f}  "
            f"step {metrics.get('perf/step_s', float('nan')):.1f}s  "
            f"gen {metrics.get('perf/gen_tokens_per_s', float('nan')):.0f} tok/s"
        )

    def log_sample(self, step: int, group: TrajectoryGroup) -> None:
        """A board with the model's best-rewarded response beside it."""
        best = int(np.argmax(group.total_rewards()))
        self.writer.add_image(f"samples/{group.game}", sample_image(group, best), step, dataformats="HWC")
        self.writer.add_text(f"samples/{group.game}/response", group.response_texts[best], step)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
