"""Env speed on one core: random legal steps with the frame a VLM sees, and batches prepared the paper's way.

    taskset -c 0 .venv/bin/python bench/envs.py [--seconds 2] [--games 2048 swap]

Per game: steps per second of one random legal action plus its RGB frame (numpy, the fast render path) at the
paper's frame size, 640x840 (Shisen-Sho on its 12x12 board, as G1 measured it); and the time to prepare a batch
of 128 states as the released trainer does (reset, then K random steps, one frame each; best of 3). G1's VLM-Gym
does 157 (2048), 40 (Shisen-Sho) and 96 (Swap) steps/s on one core; the targets are 10x those, 1000 for Tetris,
and under 1 s per batch. Ends with one line: `envs: <game>_steps_per_s=... <game>_batch_s=...` for every game.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# Run as a script, this file's folder comes first on sys.path, and this file (bench/envs.py) would shadow the
# `envs` package: drop that entry before importing it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import envs  # noqa: E402
from envs import GamePool, GameSpec  # noqa: E402

IMAGE_SIZE = (640, 840)
PAPER_STEPS_PER_S = {"2048": 157, "shisen_sho": 40, "swap": 96}
TARGET_STEPS_PER_S = {"tetris": 1000, **{name: 10 * v for name, v in PAPER_STEPS_PER_S.items()}}
TARGET_BATCH_S = 1.0
DIFFICULTY = {"shisen_sho": {"rows": 12, "cols": 12}}
BATCH = 128


def _difficulty(name: str) -> dict:
    return {"image_size": IMAGE_SIZE, **DIFFICULTY.get(name, {})}


def steps_per_s(name: str, seconds: float) -> float:
    """Random legal steps, each followed by its frame, for `seconds` (episodes restart when they end)."""
    game = envs.make(name, seed=0, **_difficulty(name))
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            if game.terminated:
                game.reset()
            legal = game.legal_actions()
            game.step(legal[rng.integers(len(legal))])
            game.render_array()
        steps += 50
    return steps / (time.perf_counter() - start)


def batch_s(name: str, repeats: int = 3) -> float:
    """Best time to prepare BATCH states the paper's way, each with its frame."""
    times = []
    for seed in range(repeats):
        pool = GamePool([GameSpec(name, difficulty=_difficulty(name))], num_games=BATCH, seed=seed)
        start = time.perf_counter()
        states = pool.sample(BATCH)
        times.append(time.perf_counter() - start)
        assert len(states) == BATCH
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per steps/s measurement")
    parser.add_argument("--games", nargs="+", default=list(envs.GAMES), choices=list(envs.GAMES))
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as G1's figures
    print(f"one core ({sorted(os.sched_getaffinity(0))}), frames {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, batch {BATCH}")
    summary = []
    for name in args.games:
        rate = steps_per_s(name, args.seconds)
        batch = batch_s(name)
        k = GameSpec(name).steps_after_reset
        paper = PAPER_STEPS_PER_S.get(name)
        vs_paper = f" ({rate / paper:.1f}x G1's {paper})" if paper else ""
        rate_ok = "ok" if rate >= TARGET_STEPS_PER_S[name] else "BELOW TARGET"
        batch_ok = "ok" if batch < TARGET_BATCH_S else "BELOW TARGET"
        print(f"{name:>10}: {rate:8.0f} steps/s{vs_paper}, target {TARGET_STEPS_PER_S[name]}: {rate_ok}")
        print(f"{'':>10}  batch of {BATCH} (reset + {k} random steps + frame): {batch:.3f} s, target < 1 s: {batch_ok}")
        summary += [f"{name}_steps_per_s={rate:.0f}", f"{name}_batch_s={batch:.3f}"]
    print("envs: " + " ".join(summary))


if __name__ == "__main__":
    main()
