"""G0 vs G1 in miniature, on CPU: does a perception-enhanced cold start make RL of the tiny model play better?

    .venv/bin/python -P bench/cold_start.py --game 2048
    .venv/bin/python -P bench/cold_start.py --game swap --rl-minutes 3 --states 1000
    .venv/bin/python -P bench/cold_start.py --game 2048 weight_sync.transport=gloo   # RL overrides, G0 and G1 alike
    .venv/bin/python -P bench/cold_start.py --cold-start tiny_g1_tetris --rl-minutes 2.6  # model=auto's tetris_mini
    .venv/bin/python -P bench/cold_start.py --game tetris pool.mode=continue --difficulty rows=10 cols=6 preview=0 \
        --sft player.kind=random   # a smaller board, the cold start on random play's states, RL on its own play

Five rows on the same seeds, all scored by launch/eval.py's `evaluate` (actors/policies.py players):
    random   a uniformly random legal move
    expert   the game's scripted expert (the cold start's teacher)
    g0       RL from the tiny model (launch/train.py model=tiny, the RL budget)
    sft      the cold-started model alone (launch/sft.py: expert responses filtered by G1's rule, supervised)
    g1       RL from the cold-started model (the same RL budget as g0)
G0 and G1 train with model=tiny_g1's RL settings (configs/model/tiny_g1.yaml: its learning rate, and responses as
long as the expert's, so both can write the full perception / think / answer convention), or with those of the
`--cold-start` named; only the starting weights differ: G0 starts from the cold start's base model, G1 from the
cold-started one. The cold start is the tiny model's recipe (actors/models.py: TINY_COLD_START_RECIPE) with this game
and its knobs, or the one named (COLD_STARTS: the very cache entry that model=auto starts from). Episodes are the paper
protocol's 200 moves: over 100 moves from reset 2048 barely separates the expert from random play (8 seeds: 1,008 vs
851), over 200 it does (2,483 vs 1,196), since random play fills the board and stalls only later.
Prints the table, the SFT eval-loss and the RL reward curves, and ends with
`cold_start: game=<g> random=<score> expert=<score> g0=<score> g1=<score> sft_minutes=<m> rl_minutes=<m>`
(mean game score; the valid-action rates and the sft row are in the table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(script: str, overrides: list[str]) -> float:
    """Runs launch/<script> with overrides; returns its wall minutes."""
    command = [sys.executable, str(REPO / "launch" / script), *overrides]
    print("running:", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return (time.perf_counter() - start) / 60


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def print_curve(name: str, points: list[tuple[int, float]], rows: int = 10) -> None:
    every = max(1, len(points) // rows)
    print(f"{name}: " + "  ".join(f"{step}:{value:+.3f}" for step, value in points[::every] + points[-1:]))


def main() -> None:
    from actors.models import COLD_STARTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="2048")
    parser.add_argument(
        "--cold-start",
        choices=sorted(COLD_STARTS),
        help="a cold start of actors/models.py's COLD_STARTS (its game, knobs and recipe; RL with its model preset) "
        "instead of --game, --difficulty and --sft",
    )
    parser.add_argument("--states", type=int, help="states the expert answers (default: the recipe's)")
    parser.add_argument("--rl-minutes", type=float, default=4.0, help="wall-clock RL budget of g0 and of g1 each")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=200, help="moves per evaluation episode (the paper's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="the evaluation's sampling temperature")
    parser.add_argument("--output", default="runs/bench-cold-start")
    parser.add_argument(
        "--difficulty", nargs="*", default=[], metavar="KNOB=VALUE", help="the game's knobs: cold start, RL and eval"
    )
    parser.add_argument(
        "--sft", nargs="*", default=[], metavar="KEY=VALUE", help="more launch/sft.py overrides for the cold start"
    )
    parser.add_argument("overrides", nargs="*", help="more launch/train.py overrides for G0 and G1 alike")
    args = parser.parse_args()

    import ray

    from actors.models import ColdStart, resolve_model
    from actors.policies import PolicyConfig, make_policy
    from launch.config import compose, resolve
    from launch.eval import evaluate
    from launch.sft import ensure_cold_start
    from learner import checkpoint

    if args.cold_start:  # a registered one: its game, knobs and recipe, and its model preset's RL settings
        cold_start, cache_name, rl_model = COLD_STARTS[args.cold_start], args.cold_start, args.cold_start
    else:
        cold_start = ColdStart(args.game, dict(k.split("=", 1) for k in args.difficulty), tuple(args.sft))
        cache_name, rl_model = ("tiny_g1" if args.game == "2048" else f"tiny_g1_{args.game}"), "tiny_g1"
    if args.states:
        cold_start = dataclasses.replace(cold_start, extra=(*cold_start.extra, f"collect.states={args.states}"))
    game = cold_start.game
    out = (REPO / args.output / game).resolve()
    base = resolve_model(dict(o.split("=", 1) for o in cold_start.overrides)["model"]).path  # G0 and the SFT start here
    rl = [f"game={game}", f"model={rl_model}", "trainer.total_steps=100000", f"trainer.max_minutes={args.rl_minutes}"]
    rl += ["checkpoint.every_steps=0", *cold_start.knobs, *args.overrides]
    rl_config = resolve(compose(rl))
    max_tokens = rl_config.actors.max_new_tokens
    difficulty = rl_config.pool.games[0].difficulty  # the eval plays the board RL trains on

    # The cold start is a cached build (for 2048 and --cold-start the very model `model=auto` starts from): built here
    # when it is not cached yet; its minutes are the build's, recorded in the cache.
    sft_hf = ensure_cold_start(cache_name, cold_start.overrides)
    ray.shutdown()  # the RL runs below start their own clusters
    sft_minutes = json.loads((sft_hf / "cold_start.json").read_text())["build_minutes"]
    for name in ("g0", "g1", "eval"):  # a rerun's TensorBoard curves must not append to the last run's
        shutil.rmtree(out / name, ignore_errors=True)
    g0_minutes = run("train.py", [*rl, f"model.path={base}", f"output_dir={out / 'g0'}"])
    g1_minutes = run("train.py", [*rl, f"model.path={sft_hf}", f"output_dir={out / 'g1'}"])

    players = {
        "random": PolicyConfig(kind="random"),
        "expert": PolicyConfig(kind="expert"),
        "g0": PolicyConfig(kind="vllm", path=str(checkpoint.latest(out / "g0" / "checkpoints") / checkpoint.HF_DIR)),
        "sft": PolicyConfig(kind="vllm", path=str(sft_hf)),
        "g1": PolicyConfig(kind="vllm", path=str(checkpoint.latest(out / "g1" / "checkpoints") / checkpoint.HF_DIR)),
    }
    results = {}
    sampling = {"max_tokens": max_tokens, "max_model_len": 1024, "temperature": args.temperature}
    for name, config in players.items():
        config = PolicyConfig(**{**config.__dict__, **sampling})
        with contextlib.closing(make_policy(config)) as policy:
            results[name] = evaluate(
                policy,
                game,
                episodes=args.episodes,
                max_steps=args.max_steps,
                difficulty=difficulty,
                out=out / "eval" / name,
            )["mean"]

    board = f" {difficulty}" if difficulty else ""
    print(
        f"\n{game}{board}: {args.episodes} episodes x {args.max_steps} moves, seeds 0..{args.episodes - 1}, "
        f"temperature {args.temperature}"
    )
    print(f"{'player':>8} {'score':>8} {'valid':>7} {'format':>7} {'percep':>7} {'length':>7}")
    for name, mean in results.items():
        print(
            f"{name:>8} {mean['score']:>8.1f} {1 - mean['invalid_rate']:>7.3f} {mean['format']:>7.3f} "
            f"{mean['perception']:>7.3f} {mean['length']:>7.1f}"
        )
    print_curve("sft eval loss", scalars(sft_hf / "tensorboard", "loss/sft_eval"))
    for name in ("g0", "g1"):
        print_curve(f"{name} reward/game", scalars(out / name / "tensorboard", "reward/game"))
        print_curve(f"{name} reward/total", scalars(out / name / "tensorboard", "reward/total"))
    print(
        f"cold_start: game={game} "
        + " ".join(f"{name}={results[name]['score']:.1f}" for name in ("random", "expert", "g0", "g1"))
        + f" g1_valid={1 - results['g1']['invalid_rate']:.3f} sft_minutes={sft_minutes:.1f}"
        f" rl_minutes={(g0_minutes + g1_minutes) / 2:.1f}"
    )


if __name__ == "__main__":
    main()
