"""Evaluates a policy on one game: several episodes side by side, with score curves, GIFs and a results table.

    python launch/eval.py game=2048 policy=random
    python launch/eval.py game=swap episodes=4 max_steps=50 output_dir=runs/swap-eval +difficulty.rows=6

Writes, under the output directory (printed at start; default runs/eval/<game>-<timestamp>): eval.log, scores.png
(the score curve of every run), run_<i>.gif (one per run, frames downscaled), results.md and results.json (mean
score, episode length and invalid-action rate, per run and overall). A policy is a function from the game state to
the answer text, so a model policy only needs to be added to POLICIES.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

import envs
from envs.base import Game
from envs.config import game_specs
from launch.overrides import quote_numeric_choices

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

log = logging.getLogger("eval")
Policy = Callable[[Game], str]  # game state -> answer text


def random_policy(seed: int) -> Policy:
    """Uniform over the legal actions, answered in the canonical format."""
    rng = np.random.default_rng(seed)

    def act(game: Game) -> str:
        legal = game.legal_actions()
        return f"<answer>{game.format_action(legal[rng.integers(len(legal))])}</answer>"

    return act


POLICIES: dict[str, Callable[[int], Policy]] = {"random": random_policy}


@dataclass
class Episode:
    """One run: its game, policy, and what was recorded while it played."""

    seed: int
    game: Game
    policy: Policy
    scores: list[float] = field(default_factory=list)  # the game's score after 0, 1, ... steps
    frames: list[np.ndarray] = field(default_factory=list)  # (h, w, 3) uint8 downscaled frames
    invalid: int = 0  # steps whose answer held no legal action
    done: bool = False

    @property
    def length(self) -> int:
        return len(self.scores) - 1

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "score": self.scores[-1],
            "length": self.length,
            "invalid_rate": self.invalid / max(1, self.length),
        }


def _check(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """Validates the config (before anything runs); returns the game name and its difficulty."""
    specs = game_specs(cfg.game)
    if len(specs) != 1:
        raise ValueError(
            f"eval: key 'game' must select one game ({', '.join(envs.GAMES)}); got {[s.name for s in specs]}"
        )
    if cfg.policy not in POLICIES:
        raise ValueError(f"eval: key 'policy' must be one of {', '.join(POLICIES)}; got {cfg.policy!r}")
    for key in ("episodes", "max_steps", "gif_max_frames"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"eval: key {key!r} must be an integer >= 1; got {cfg[key]!r}")
    if not 0 < float(cfg.gif_scale) <= 1:
        raise ValueError(f"eval: key 'gif_scale' must be a number in (0, 1]; got {cfg.gif_scale!r}")
    return specs[0].name, {**specs[0].difficulty, **OmegaConf.to_container(cfg.difficulty, resolve=True)}


def _frame(game: Game, scale: float) -> np.ndarray:
    frame = game.render_array()
    if scale == 1:
        return frame
    h, w, _ = frame.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(frame).resize(size, Image.Resampling.BOX, reducing_gap=1.0)  # reduce(): ~6x faster
    return np.asarray(small)


def play(episodes: list[Episode], max_steps: int, gif_scale: float) -> None:
    """Steps every episode in turn until each ends or reaches max_steps."""
    for ep in episodes:
        ep.scores.append(float(ep.game.score))
        ep.frames.append(_frame(ep.game, gif_scale))
    with tqdm(total=len(episodes) * max_steps, desc="eval", unit="step") as bar:
        for _ in range(max_steps):
            active = [ep for ep in episodes if not ep.done]
            if not active:
                break
            for ep in active:
                result = ep.game.step(ep.game.parse_action(ep.policy(ep.game)))
                ep.invalid += not result.info.get("valid", True)
                ep.scores.append(float(ep.game.score))
                ep.frames.append(_frame(ep.game, gif_scale))
                ep.done = result.terminated or ep.length >= max_steps
                bar.update(max_steps - ep.length if ep.done else 1)


def write_gif(path: Path, frames: list[np.ndarray], frame_ms: int = 200) -> None:
    """An animated GIF of (h, w, 3) uint8 frames, all mapped onto one palette.

    One palette, taken from a few frames spread over the run, instead of one per frame: 7x faster to write than
    imageio's per-frame quantization and half the size, and boards use few colours anyway.
    """
    sample = np.concatenate([frames[k] for k in np.linspace(0, len(frames) - 1, min(8, len(frames))).astype(int)])
    palette = Image.fromarray(sample).quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def write_outputs(out: Path, game: str, policy: str, episodes: list[Episode], gif_max_frames: int) -> dict[str, Any]:
    """Writes scores.png, run_<i>.gif, results.json and results.md; returns the results."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, ep in enumerate(episodes):
        ax.plot(range(len(ep.scores)), ep.scores, label=f"run {i} (seed {ep.seed})")
    ax.set(xlabel="step", ylabel="score", title=f"{game}: {policy} policy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
    plt.close(fig)

    for i, ep in enumerate(episodes):
        keep = np.unique(np.linspace(0, len(ep.frames) - 1, min(gif_max_frames, len(ep.frames))).round().astype(int))
        write_gif(out / f"run_{i}.gif", [ep.frames[k] for k in keep])

    runs = [ep.summary() for ep in episodes]
    mean = {key: float(np.mean([run[key] for run in runs])) for key in ("score", "length", "invalid_rate")}
    results = {"game": game, "policy": policy, "runs": runs, "mean": mean}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# {game}, {policy} policy, {len(runs)} runs",
        "",
        "| run | seed | score | length | invalid-action rate |",
        "|---|---|---|---|---|",
        *(
            f"| {i} | {r['seed']} | {r['score']:g} | {r['length']} | {r['invalid_rate']:.3f} |"
            for i, r in enumerate(runs)
        ),
        f"| mean | | {mean['score']:.2f} | {mean['length']:.1f} | {mean['invalid_rate']:.3f} |",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    game_name, difficulty = _check(cfg)
    out = Path(HydraConfig.get().runtime.output_dir)
    print(f"eval: output directory {out}", flush=True)
    episodes = [
        Episode(seed, envs.make(game_name, seed=seed, **difficulty), POLICIES[cfg.policy](seed))
        for seed in range(cfg.seed, cfg.seed + cfg.episodes)
    ]  # every game is built (and its knobs checked) before anything plays
    log.info("game %s, difficulty %s, policy %s, %d episodes", game_name, difficulty, cfg.policy, cfg.episodes)
    play(episodes, cfg.max_steps, float(cfg.gif_scale))
    results = write_outputs(out, game_name, cfg.policy, episodes, cfg.gif_max_frames)
    for i, run in enumerate(results["runs"]):
        log.info("run %d: %s", i, run)
    log.info("mean: %s", results["mean"])


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    main()
