"""Does a model read Tetris in miniature before it chooses? Greedy answers of checkpoints on random-play boards.

    .venv/bin/python -P bench/tetris_reading.py DIR [DIR ...] [--states 96]

DIR: a model directory (a checkpoint's hf/, or the cached cold start ~/.cache/vlm_gym_rl/tiny_g1_tetris-*). The boards
are those the cold start learned from (configs/game/tetris_mini.yaml's difficulty; reset, then 0-7 random legal
placements, seeded), answered greedily by actors/policies.py's vLLM policy (the eval's prompt and template). Per model:
- heights exact / per column: the `Column heights h0 ... h5.` that opens its `<think>` (the expert's convention)
  against the board's own (`Tetris.column_heights`): what its choice is made from;
- legal: the answer is one of the legal placements;
- expert: the answer is the expert's placement.
Why it exists: G1's valid-action rate on this board is bounded by how well the model reads it (README, Cold start).
Ends with one line `tetris_reading: <dir>=<heights exact>/<per column>/<legal>/<expert> ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import sys
from pathlib import Path

import numpy as np

# Run as a script, this file's folder comes first on sys.path, and bench/envs.py would shadow the `envs` package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import envs  # noqa: E402
from actors.models import TETRIS_MINI  # noqa: E402
from actors.policies import PolicyConfig, make_policy  # noqa: E402

HEIGHTS = re.compile(r"Column heights ([0-9 ]+)\.")


def boards(n: int) -> list[envs.Tetris]:
    """n seeded tetris_mini games, each after 0-7 random legal placements (finished games are left out)."""
    rng, placements, games = random.Random(0), np.random.default_rng(0), []
    for seed in range(n):
        game = envs.make("tetris", seed=500 + seed, **TETRIS_MINI)
        for _ in range(rng.randrange(8)):
            if not game.terminated:
                game.step(game.random_legal_action(placements))
        if not game.terminated:
            games.append(game)
    return games


def read(model_dir: str, games: list[envs.Tetris]) -> tuple[float, float, float, float]:
    """(heights exact, heights per column, legal, expert) shares over the boards, greedy answers."""
    config = PolicyConfig(kind="vllm", path=model_dir, temperature=0.0, max_tokens=160, max_model_len=1024)
    with contextlib.closing(make_policy(config)) as policy:
        responses = policy.respond(games)
    exact = columns = legal = expert = 0.0
    for game, response in zip(games, responses, strict=True):
        truth = game.column_heights()
        if match := HEIGHTS.search(response):
            said = [int(h) for h in match.group(1).split()]
            exact += said == truth
            columns += sum(a == b for a, b in zip(said, truth, strict=False)) / len(truth)
        action = game.parse_action(response)
        legal += action in game.legal_actions()
        expert += action is not None and game.format_action(action) == game.format_action(game.expert_move().action)
    return exact / len(games), columns / len(games), legal / len(games), expert / len(games)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="model directories")
    parser.add_argument("--states", type=int, default=96, help="games drawn (those finished early are left out)")
    args = parser.parse_args()
    games = boards(args.states)
    rows = {}
    print(f"{len(games)} boards; heights exact / per column, legal answer, the expert's answer")
    for model_dir in args.dirs:
        rows[model_dir] = read(model_dir, games)
        print(f"{model_dir}: " + " / ".join(f"{share:.2f}" for share in rows[model_dir]), flush=True)
    summary = " ".join(f"{d}=" + "/".join(f"{s:.2f}" for s in shares) for d, shares in rows.items())
    print(f"tetris_reading: {summary}")


if __name__ == "__main__":
    main()
