"""The scripted experts against random play: the "teacher" and "random" rows of every results table.

    .venv/bin/python -P bench/experts.py [--episodes 5] [--max-steps 3000] [--games 2048 swap]

Per game, `--episodes` seeded episodes (seeds 0, 1, ...) with uniformly random legal moves and with the game's
`expert_move`, on the training difficulty (each game's defaults) and, for Shisen-Sho, also on G1's 12 x 12 board
(the 6 x 6 default is cleared even by random play). Prints the mean score (the game's evaluation score: 2048 merge
points, Shisen-Sho pairs removed, Swap tiles cleared, Tetris pieces + lines), the mean episode return (the sum of the
training rewards), the mean episode length and the expert's time per move. An episode stops at `--max-steps`, and
Tetris's at 1000 pieces (see SETTINGS); the table says how many did. Ends with one line
`experts: <row>_random=<mean score> <row>_expert=<mean score> ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

# Run as a script, this file's folder comes first on sys.path, and bench/envs.py would shadow the `envs` package:
# drop that entry before importing it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import envs  # noqa: E402

# (row name, game, difficulty, move cap or None for --max-steps): the training defaults, and Shisen-Sho on G1's
# board as well. Tetris's expert rarely tops out, so its episodes stop at 1000 pieces to keep the bench short.
SETTINGS = (
    ("tetris", "tetris", {}, 1000),
    ("2048", "2048", {}, None),
    ("shisen_sho", "shisen_sho", {}, None),
    ("shisen_sho_12x12", "shisen_sho", {"rows": 12, "cols": 12}, None),
    ("swap", "swap", {}, None),
)
POLICIES = ("random", "expert")


@dataclass(frozen=True)
class Episode:
    """One played episode: the game's score, the summed training rewards, its length, and the time spent choosing."""

    score: float
    ret: float
    steps: int
    capped: bool
    choose_s: float


def play(name: str, difficulty: dict, seed: int, policy: str, max_steps: int) -> Episode:
    """One episode of `policy` ("random": uniform legal moves from a seeded rng; "expert": `expert_move`)."""
    game = envs.make(name, seed=seed, **difficulty)
    rng = np.random.default_rng(seed)
    ret = choose_s = 0.0
    while not game.terminated and game.steps < max_steps:
        start = time.perf_counter()
        action = game.expert_move().action if policy == "expert" else game.random_legal_action(rng)
        choose_s += time.perf_counter() - start
        ret += game.step(action).reward
    return Episode(game.score, ret, game.steps, not game.terminated, choose_s)


def has_expert(name: str) -> bool:
    """Whether the game overrides `Game.expert_move` (a colleague's game may not have one yet)."""
    return envs.GAMES[name].expert_move is not envs.Game.expert_move


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=5, help="seeded episodes per game and policy")
    parser.add_argument("--max-steps", type=int, default=3000, help="an episode stops after this many moves")
    parser.add_argument("--games", nargs="+", default=list(envs.GAMES), choices=list(envs.GAMES))
    args = parser.parse_args()
    print(f"{args.episodes} episodes (seeds 0-{args.episodes - 1}) per row and policy, at most {args.max_steps} moves")
    print(f"{'game':>17} {'policy':>7} {'score':>9} {'return':>9} {'length':>7} {'capped':>6} {'ms/move':>8}")
    summary = []
    for row, name, difficulty, cap in SETTINGS:
        if name not in args.games:
            continue
        if not has_expert(name):
            print(f"{row:>17}: no expert yet, skipped")
            continue
        for policy in POLICIES:
            runs = [play(name, difficulty, seed, policy, cap or args.max_steps) for seed in range(args.episodes)]
            score = float(np.mean([r.score for r in runs]))
            ms = 1000 * sum(r.choose_s for r in runs) / max(1, sum(r.steps for r in runs))
            print(
                f"{row:>17} {policy:>7} {score:9.1f} {np.mean([r.ret for r in runs]):9.1f} "
                f"{np.mean([r.steps for r in runs]):7.0f} {sum(r.capped for r in runs):6d} {ms:8.2f}"
            )
            summary.append(f"{row}_{policy}={score:.1f}")
    print("experts: " + " ".join(summary))


if __name__ == "__main__":
    main()
