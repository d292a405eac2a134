"""What a user watches: TensorBoard scalars and sample boards, a progress bar, and one summary line per step.

Metrics of the rollout actors are reduced with RLlib's MetricsLogger (mean over the rounds of a step, as RLlib reduces
its EnvRunners' metrics), except the fleet's rates (`fleet_metrics`: sums over actors that run at the same time, not
means of their rates) and the rewards: `reward/*` are those of the batch trained on (`batch_metrics`), the rounds'
own are `rollout/reward_*`. Every tag is listed in the README's "Monitoring" table.
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from replay.buffer import REWARD_PARTS, BufferItem, BufferStats
from replay.trajectory import TrajectoryGroup

if TYPE_CHECKING:
    from actors.rollout_actor import RoundStats

# Window large enough that a step's values are all kept: the reduction is the plain mean over the step.
_WHOLE_STEP = 10**9


def reduce_rounds(round_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each tag over the rounds of a step (several actors, possibly several rounds each)."""
    step_logger = MetricsLogger(root=True)
    for metrics in round_metrics:
        step_logger.log_dict(metrics, reduce="mean", window=_WHOLE_STEP)
    return {key: float(value) for key, value in step_logger.compile().items()} if round_metrics else {}


def fleet_metrics(
    rounds: Sequence[tuple[int, RoundStats]], num_actors: int, window_s: float, wait_s: float
) -> dict[str, float]:
    """The fleet's figures over one step's window (from the previous batch to this one).

    Args:
        rounds: (actor index, stats) of the rounds that finished in the window.
        num_actors: engines in the fleet.
        window_s: the window's wall time.
        wait_s: how long of it the learner waited for the batch (`RolloutDriver.collect`).

    Returns:
        `perf/gen_tokens_per_s` and `perf/env_steps_per_s`: each actor's rate (its tokens over its generation time,
        its steps over its env time) summed over the actors, as they run at the same time; `perf/engine_idle_share`:
        the share of the engines' wall time (num_actors x window) spent outside generate; `perf/learner_idle_share`:
        wait_s / window_s; `rollout/groups_made`: groups the rounds offered the buffer.
    """
    by_actor: dict[int, list[RoundStats]] = defaultdict(list)
    for index, stats in rounds:
        by_actor[index].append(stats)

    def rate(amount: str, seconds: str) -> float:
        totals = [
            [sum(getattr(r, key) for r in actor_rounds) for key in (amount, seconds)]
            for actor_rounds in by_actor.values()
        ]
        return sum(a / s for a, s in totals if s > 0)

    generating = sum(stats.generation_s for _, stats in rounds)
    window_s = max(window_s, 1e-9)
    return {
        "perf/gen_tokens_per_s": rate("tokens_generated", "generation_s"),
        "perf/env_steps_per_s": rate("env_steps", "env_s"),
        "perf/engine_idle_share": max(0.0, 1.0 - generating / (num_actors * window_s)),
        "perf/learner_idle_share": min(1.0, wait_s / window_s),
        "rollout/groups_made": float(sum(stats.num_groups for _, stats in rounds)),
    }


def batch_metrics(items: Sequence[BufferItem], stats: BufferStats) -> tuple[dict[str, float], dict[str, list[int]]]:
    """The trained batch's rewards and the buffer's state after taking it.

    Returns:
        Scalars: `reward/<part>` (mean over the batch's responses; `reward/<game>/<part>` too when several games),
        `buffer/size`, `buffer/staleness` (the batch's mean), `buffer/dropped` (the buffer's own drops: a dead
        actor's groups are in faults/lost_groups); histograms: `buffer/staleness` (each group's).
    """
    by_game: dict[str, list[BufferItem]] = defaultdict(list)
    for item in items:
        by_game[item.game].append(item)

    def rewards(prefix: str, group: Sequence[BufferItem]) -> dict[str, float]:
        return {f"{prefix}{part}": float(np.mean([it.reward_mean[part] for it in group])) for part in REWARD_PARTS}

    metrics = rewards("reward/", items)
    if len(by_game) > 1:
        for game, group in by_game.items():
            metrics.update(rewards(f"reward/{game}/", group))
    metrics["buffer/size"] = float(stats.size)
    metrics["buffer/staleness"] = stats.last_batch_staleness_mean
    metrics["buffer/dropped"] = float(stats.dropped - stats.drops["actor_died"])
    return metrics, {"buffer/staleness": list(stats.last_batch_staleness)}


def _wrapped(text: str, width: int = 60) -> list[str]:
    return [part for line in text.splitlines() or [""] for part in textwrap.wrap(line, width) or [""]]


def _text_panel(lines: list[str], width: int, height: int) -> Image.Image:
    panel = Image.new("RGB", (width, height), "white")
    font = ImageFont.load_default(size=14)
    ImageDraw.Draw(panel).multiline_text((8, 8), "\n".join(lines[: height // 18]), fill="black", font=font)
    return panel


def sample_image(group: TrajectoryGroup, index: int = 0, width: int = 448) -> np.ndarray:
    """The board the model saw, its ground-truth text (the perception target) and one of the model's responses with
    its rewards, side by side, as an (H, 3W, 3) array: a misread board shows as a difference of the two texts."""
    board = Image.fromarray(group.image)
    board = board.resize((width, max(1, round(board.height * width / board.width))))
    reward = group.rewards[index]
    header = (
        f"{group.game} v{group.policy_version}  total {reward.total:+.2f}  game {reward.game:+.2f}  "
        f"format {reward.format:.2f}  perception {reward.perception:.2f}"
    )
    truth = _text_panel(["ground truth (text_observation)", "", *_wrapped(group.text_observation)], width, board.height)
    response = _text_panel([header, "", *_wrapped(group.response_texts[index][:1200])], width, board.height)
    canvas = Image.new("RGB", (3 * width, board.height), "white")
    for column, panel in enumerate((board, truth, response)):
        canvas.paste(panel, (column * width, 0))
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

    def log_step(self, step: int, metrics: dict[str, float], histograms: dict[str, list[int]] | None = None) -> None:
        """Writes every scalar and histogram at `step` and prints the step's summary line."""
        for key, value in sorted(metrics.items()):
            self.writer.add_scalar(key, value, step)
        for key, values in sorted((histograms or {}).items()):
            if values:
                self.writer.add_histogram(key, np.asarray(values), step)
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
