"""Evaluates a policy on the games, under the paper's protocol or lmgame-Bench's, and compares evaluations.

    python launch/eval.py game=2048 policy=random
    python launch/eval.py game=all policy=expert protocol=lmgame
    python launch/eval.py game=tetris policy=vllm policy.path=runs/x/checkpoints/step-40/hf
    python launch/eval.py game=all policy=openai policy.base_url=http://127.0.0.1:8000/v1 policy.model=NAME
    python launch/eval.py game=swap episodes=4 max_steps=50 output_dir=runs/swap-eval +difficulty.rows=6
    python launch/eval.py "report=[runs/eval/a,runs/eval/b]"     # one comparison table from several evaluations

The episodes of a game play side by side: each turn, the policy answers every running episode in one batch (one
vLLM generate call, or `policy.concurrency` requests in flight). Every response is scored with `envs.score` for its
format and perception (the paper's exact rules, whatever a training config says), then its action is played.

Writes, under the output directory (printed at start; default runs/eval/<game>-<policy>-<timestamp>): eval.log,
results.md and results.json (one row per game: score, return, episode length, invalid-action rate, format and
perception accuracy, failed replies; mean and std over the runs, and every run), and per game `<game>/scores.png`
(the score curve of every run) and `<game>/run_<i>.gif` (frames downscaled). `report=[dir, ...]` instead merges the
results.json of earlier evaluations into report.md: the paper's kind of table, a row per policy, a column per game.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
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
from actors.policies import Policy, PolicyConfig, make_policy
from envs.base import Game
from envs.config import game_specs
from launch.overrides import quote_numeric_choices

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

log = logging.getLogger("eval")
METRICS = ("score", "return", "length", "invalid_rate", "format", "perception")


@dataclass(frozen=True)
class Protocol:
    """How a game's episodes are played and when they stop.

    Attributes:
        name: paper | lmgame.
        max_steps: an episode stops after this many steps if the game has not ended.
        patience: an episode stops after this many steps in a row that leave the board unchanged (None: never).
        episodes: runs per game.
    """

    name: str
    max_steps: int
    patience: int | None
    episodes: int


# The paper's: episodes from reset, the games' per-step rewards, no early stop. lmgame-Bench's (anchors.md): its step
# caps, its stop after N unchanged steps and 3 runs; it defines Tetris and 2048 only. `game.score` is lmgame-Bench's
# score in every game that has one (Tetris: +1 per piece, +1 per line; 2048: the merged tiles).
PROTOCOLS: dict[str, dict[str | None, Protocol]] = {
    "paper": {None: Protocol("paper", max_steps=200, patience=None, episodes=8)},
    "lmgame": {
        "tetris": Protocol("lmgame", max_steps=2000, patience=30, episodes=3),
        "2048": Protocol("lmgame", max_steps=1000, patience=10, episodes=3),
    },
}


def defines(protocol: str, game: str) -> bool:
    """Whether `protocol` has rules for `game`.

    Raises:
        ValueError: for an unknown protocol, naming the allowed ones.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval: key 'protocol' must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return None in PROTOCOLS[protocol] or game in PROTOCOLS[protocol]


def protocol_for(name: str, game: str, episodes: int | None = None, max_steps: int | None = None) -> Protocol:
    """The protocol `name` for `game`, with `episodes` and `max_steps` overriding its own when given.

    Raises:
        ValueError: naming the allowed protocols, or the games the protocol defines.
    """
    by_game = PROTOCOLS[name] if defines(name, game) else {}
    base = by_game.get(game, by_game.get(None))
    if base is None:
        raise ValueError(f"eval: protocol {name!r} defines the games {', '.join(PROTOCOLS[name])}; got {game!r}")
    return Protocol(
        name,
        max_steps=base.max_steps if max_steps is None else max_steps,
        patience=base.patience,
        episodes=base.episodes if episodes is None else episodes,
    )


@dataclass
class Episode:
    """One run: its game and what was recorded while it played."""

    seed: int
    game: Game
    scores: list[float] = field(default_factory=list)  # the game's score after 0, 1, ... steps
    frames: list[np.ndarray] = field(default_factory=list)  # (h, w, 3) uint8 downscaled frames (when recorded)
    rewards: list[float] = field(default_factory=list)  # the game's per-step rewards
    formats: list[float] = field(default_factory=list)  # format credit of each response (envs.score)
    perceptions: list[float] = field(default_factory=list)  # perception credit of each response
    invalid: int = 0  # steps whose answer held no legal action
    unchanged: int = 0  # steps in a row that left the board as it was
    stop: str = ""  # why it ended: terminated, max_steps, unchanged ("" while it runs)

    @property
    def length(self) -> int:
        return len(self.scores) - 1

    def summary(self) -> dict[str, Any]:
        steps = max(1, self.length)
        return {
            "seed": self.seed,
            "score": self.scores[-1],
            "return": float(sum(self.rewards)),
            "length": self.length,
            "invalid_rate": self.invalid / steps,
            "format": float(np.mean(self.formats)) if self.formats else 0.0,
            "perception": float(np.mean(self.perceptions)) if self.perceptions else 0.0,
            "stop": self.stop,
        }


def _frame(game: Game, scale: float) -> np.ndarray:
    frame = game.render_array()
    if scale == 1:
        return frame
    h, w, _ = frame.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(frame).resize(size, Image.Resampling.BOX, reducing_gap=1.0)  # reduce(): ~6x faster
    return np.asarray(small)


def _take(ep: Episode, response: str, protocol: Protocol, gif_scale: float | None) -> None:
    """Scores one response, plays its action (an invalid one: the game's penalty, board unchanged), checks the stops."""
    credit = envs.score(ep.game, response)  # default RewardConfig: the paper's exact format and perception rules
    ep.formats.append(credit.format)
    ep.perceptions.append(credit.perception)
    before = ep.game.text_observation() if protocol.patience is not None else None
    result = ep.game.step(ep.game.parse_action(response))
    ep.invalid += not result.info.get("valid", True)
    ep.rewards.append(float(result.reward))
    ep.scores.append(float(ep.game.score))
    if gif_scale is not None:
        ep.frames.append(_frame(ep.game, gif_scale))
    ep.unchanged = ep.unchanged + 1 if before is not None and before == ep.game.text_observation() else 0
    if result.terminated:
        ep.stop = "terminated"
    elif ep.length >= protocol.max_steps:
        ep.stop = "max_steps"
    elif protocol.patience is not None and ep.unchanged >= protocol.patience:
        ep.stop = "unchanged"


def play(episodes: list[Episode], policy: Policy, protocol: Protocol, gif_scale: float | None = None) -> None:
    """Plays every episode until it stops: each turn, one batched `policy.respond` over the running episodes."""
    for ep in episodes:
        ep.scores.append(float(ep.game.score))
        if gif_scale is not None:
            ep.frames.append(_frame(ep.game, gif_scale))
    total = len(episodes) * protocol.max_steps
    with tqdm(total=total, desc=f"eval {episodes[0].game.name}", unit="step", disable=None) as bar:
        while active := [ep for ep in episodes if not ep.stop]:
            responses = policy.respond([ep.game for ep in active])
            for ep, response in zip(active, responses, strict=True):
                _take(ep, response, protocol, gif_scale)
                bar.update(protocol.max_steps - ep.length + 1 if ep.stop else 1)


def evaluate(
    policy: Policy,
    game: str,
    protocol: str = "paper",
    episodes: int | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    difficulty: dict[str, Any] | None = None,
    out: Path | None = None,
    gif_scale: float = 0.5,
    gif_max_frames: int = 300,
) -> dict[str, Any]:
    """Evaluates `policy` on `game`: episode i plays the game seeded `seed + i`, so every policy meets the same boards.

    Args:
        policy: from actors.policies.make_policy.
        game: a registry name (envs.GAMES).
        protocol: paper | lmgame (see PROTOCOLS); `episodes` and `max_steps` override its own when given.
        difficulty: the game's knobs.
        out: when given, the score curves (scores.png) and one GIF per run (run_<i>.gif) are written there.
        gif_scale: GIF frames are the game's frames scaled by this.
        gif_max_frames: longer episodes keep evenly spaced frames.

    Returns:
        {game, policy, protocol, max_steps, patience, difficulty, runs: [per-run METRICS + seed, stop], mean, std,
        failed_replies}.
    """
    rules = protocol_for(protocol, game, episodes, max_steps)
    knobs = dict(difficulty or {})
    runs = [Episode(s, envs.make(game, seed=s, **knobs)) for s in range(seed, seed + rules.episodes)]
    failures_before = policy.failures
    play(runs, policy, rules, gif_scale if out is not None else None)
    summaries = [ep.summary() for ep in runs]
    results = {
        "game": game,
        "policy": policy.name,
        "protocol": rules.name,
        "max_steps": rules.max_steps,
        "patience": rules.patience,
        "difficulty": knobs,
        "runs": summaries,
        "mean": {key: float(np.mean([run[key] for run in summaries])) for key in METRICS},
        "std": {key: float(np.std([run[key] for run in summaries])) for key in METRICS},
        "failed_replies": policy.failures - failures_before,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_curves(out / "scores.png", f"{game}: {policy.name}", runs)
        for i, ep in enumerate(runs):
            keep = np.unique(np.linspace(0, len(ep.frames) - 1, min(gif_max_frames, len(ep.frames))).round())
            write_gif(out / f"run_{i}.gif", [ep.frames[k] for k in keep.astype(int)])
    return results


def _write_curves(path: Path, title: str, runs: list[Episode]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, ep in enumerate(runs):
        ax.plot(range(len(ep.scores)), ep.scores, label=f"run {i} (seed {ep.seed})")
    ax.set(xlabel="step", ylabel="score", title=title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_gif(path: Path, frames: list[np.ndarray], frame_ms: int = 200) -> None:
    """An animated GIF of (h, w, 3) uint8 frames, all mapped onto one palette.

    One palette, taken from a few frames spread over the run, instead of one per frame: 7x faster to write than
    imageio's per-frame quantization and half the size, and boards use few colours anyway.
    """
    sample = np.concatenate([frames[k] for k in np.linspace(0, len(frames) - 1, min(8, len(frames))).astype(int)])
    palette = Image.fromarray(sample).quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


# ---- tables ---------------------------------------------------------------------------------------------------------
def _pm(result: dict[str, Any], key: str, digits: int) -> str:
    return f"{result['mean'][key]:.{digits}f} ± {result['std'][key]:.{digits}f}"


def results_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per policy and game, every metric (mean ± std over the runs)."""
    header = (
        "| policy | game | protocol | runs | score | return | length | invalid-action rate | format | perception "
        "| failed replies |"
    )
    rows = [
        f"| {r['policy']} | {r['game']} | {r['protocol']} | {len(r['runs'])} | {_pm(r, 'score', 1)} "
        f"| {_pm(r, 'return', 1)} | {_pm(r, 'length', 1)} | {r['mean']['invalid_rate']:.3f} "
        f"| {r['mean']['format']:.3f} | {r['mean']['perception']:.3f} | {r['failed_replies']} |"
        for r in results
    ]
    return [header, "|" + "---|" * (header.count("|") - 1), *rows]


def comparison_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the paper's table: a row per policy and protocol, a column per game, score mean ± std."""
    games = list(dict.fromkeys(r["game"] for r in results))
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for r in results:
        rows.setdefault((r["policy"], r["protocol"]), {})[r["game"]] = _pm(r, "score", 1)
    header = "| policy | protocol | " + " | ".join(games) + " |"
    return [
        header,
        "|" + "---|" * (len(games) + 2),
        *(f"| {p} | {proto} | " + " | ".join(c.get(g, "") for g in games) + " |" for (p, proto), c in rows.items()),
    ]


def write_results(out: Path, results: list[dict[str, Any]]) -> None:
    """results.json ({policy, games: [evaluate's results]}) and results.md (the table, then every run)."""
    policy = results[0]["policy"]
    (out / "results.json").write_text(json.dumps({"policy": policy, "games": results}, indent=2))
    lines = [f"# {policy}", "", *results_table(results)]
    for r in results:
        lines += ["", f"## {r['game']}: {len(r['runs'])} runs, {r['failed_replies']} failed replies", ""]
        lines += ["| run | seed | score | return | length | invalid-action rate | format | perception | stop |"]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {i} | {run['seed']} | {run['score']:g} | {run['return']:g} | {run['length']} "
            f"| {run['invalid_rate']:.3f} | {run['format']:.3f} | {run['perception']:.3f} | {run['stop']} |"
            for i, run in enumerate(r["runs"])
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write_report(out: Path, sources: list[str]) -> str:
    """Merges the results.json of earlier evaluations into report.md; returns its text.

    Raises:
        FileNotFoundError: naming a source directory without results.json.
    """
    results = []
    for source in sources:
        path = Path(source) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"eval: key 'report' names {source}, which holds no results.json")
        results += json.loads(path.read_text())["games"]
    lines = ["# Evaluation report", "", "Score (mean ± std over the runs)", "", *comparison_table(results)]
    lines += ["", "All metrics", "", *results_table(results), "", "Sources: " + ", ".join(sources)]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


# ---- command line ---------------------------------------------------------------------------------------------------
def _check(cfg: DictConfig) -> tuple[list[tuple[str, dict[str, Any]]], PolicyConfig]:
    """Validates the config before anything runs: the games (name, difficulty) to play, and the policy config."""
    specs = game_specs(cfg.game)
    games = [s for s in specs if defines(cfg.protocol, s.name)]
    if not games:
        protocol_for(cfg.protocol, specs[0].name)  # raises, naming the games the protocol defines
    for key in ("episodes", "max_steps"):
        value = cfg[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"eval: key {key!r} must be null (the protocol's) or an integer >= 1; got {value!r}")
    if not isinstance(cfg.gif_max_frames, int) or cfg.gif_max_frames < 1:
        raise ValueError(f"eval: key 'gif_max_frames' must be an integer >= 1; got {cfg.gif_max_frames!r}")
    if not 0 < float(cfg.gif_scale) <= 1:
        raise ValueError(f"eval: key 'gif_scale' must be a number in (0, 1]; got {cfg.gif_scale!r}")
    extra = OmegaConf.to_container(cfg.difficulty, resolve=True)
    chosen = [(s.name, envs.GAMES[s.name].check_difficulty({**s.difficulty, **extra})) for s in games]
    return chosen, PolicyConfig.from_dict(OmegaConf.to_container(cfg.policy, resolve=True))


@hydra.main(version_base=None, config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.report is not None:
        sources = [cfg.report] if isinstance(cfg.report, str) else list(cfg.report)
        print(write_report(out, sources), flush=True)
        print(f"eval: report written to {out / 'report.md'}", flush=True)
        return
    games, policy_config = _check(cfg)
    print(f"eval: output directory {out}", flush=True)
    skipped = [s.name for s in game_specs(cfg.game) if s.name not in {name for name, _ in games}]
    if skipped:
        log.info("protocol %s does not define %s: not evaluated", cfg.protocol, ", ".join(skipped))
    with contextlib.closing(make_policy(policy_config)) as policy:  # a vllm policy's engine is shut down
        log.info("policy %s (%s), protocol %s", policy.name, policy_config, cfg.protocol)
        results = []
        for name, difficulty in games:
            log.info("game %s, difficulty %s", name, difficulty)
            result = evaluate(
                policy,
                name,
                cfg.protocol,
                episodes=cfg.episodes,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
                difficulty=difficulty,
                out=out / name,
                gif_scale=float(cfg.gif_scale),
                gif_max_frames=cfg.gif_max_frames,
            )
            for i, run in enumerate(result["runs"]):
                log.info("%s run %d: %s", name, i, run)
            log.info("%s mean: %s; failed replies: %d", name, result["mean"], result["failed_replies"])
            results.append(result)
    write_results(out, results)
    print("\n".join(results_table(results)), flush=True)


def _command_line(argv: list[str]) -> list[str]:
    """`game=all` is the mix of every game (configs/game/mix.yaml); numeric game names are quoted for Hydra."""
    return quote_numeric_choices(["game=mix" if arg == "game=all" else arg for arg in argv])


if __name__ == "__main__":
    sys.argv = _command_line(sys.argv)
    main()
