"""G0 vs G1 in miniature, on CPU: does a perception-enhanced cold start make RL of the tiny model play better?

    .venv/bin/python -P bench/cold_start.py --game 2048
    .venv/bin/python -P bench/cold_start.py --game swap --rl-minutes 3 --states 1000

Five rows on the same seeds, all scored by launch/eval.py's `evaluate` (actors/policies.py players):
    random   a uniformly random legal move
    expert   the game's scripted expert (the cold start's teacher)
    g0       RL from the tiny model (launch/train.py model=tiny, the RL budget)
    sft      the cold-started model alone (launch/sft.py: expert responses filtered by G1's rule, supervised)
    g1       RL from the cold-started model (the same RL budget as g0)
G0 and G1 train with the same settings; only the starting weights differ. Responses may be as long as the expert's
(`--max-new-tokens`, model=tiny_g1's 128), so both can write the full perception / think / answer convention. The cold
start is model=tiny_g1's recipe (actors/models.py: 1,000 states, 2 epochs of batches of 8). Episodes are the paper
protocol's 200 moves: over 100 moves from reset 2048 barely separates the expert from random play (8 seeds: 1,008 vs
851), over 200 it does (2,483 vs 1,196), since random play fills the board and stalls only later.
Prints the table, the SFT eval-loss and the RL reward curves, and ends with
`cold_start: game=<g> random=<score> expert=<score> g0=<score> g1=<score> sft_minutes=<m> rl_minutes=<m>`
(mean game score; the valid-action rates and the sft row are in the table).
"""

from __future__ import annotations

import argparse
import os
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="2048")
    parser.add_argument("--states", type=int, default=1000, help="states the expert answers for the cold start")
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--sft-batch-size", type=int, default=8)
    parser.add_argument("--rl-minutes", type=float, default=4.0, help="wall-clock RL budget of g0 and of g1 each")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="response cap of RL and eval (G0 and G1)")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=200, help="moves per evaluation episode (the paper's)")
    parser.add_argument("--output", default="runs/bench-cold-start")
    args = parser.parse_args()

    from actors.policies import PolicyConfig, make_policy
    from launch.eval import evaluate
    from learner import checkpoint

    out = (REPO / args.output / args.game).resolve()
    game = [f"game={args.game}", "model=tiny"]
    rl = [*game, "trainer.total_steps=100000", f"trainer.max_minutes={args.rl_minutes}"]
    rl += [f"actors.max_new_tokens={args.max_new_tokens}", "checkpoint.every_steps=0"]

    sft_minutes = run("sft.py", [*game, f"collect.states={args.states}", f"sft.epochs={args.sft_epochs}",
                                 f"sft.batch_size={args.sft_batch_size}", f"output_dir={out / 'sft'}"])  # fmt: skip
    sft_hf = checkpoint.latest(out / "sft" / "checkpoints") / checkpoint.HF_DIR
    g0_minutes = run("train.py", [*rl, f"output_dir={out / 'g0'}"])
    g1_minutes = run("train.py", [*rl, f"model.path={sft_hf}", f"output_dir={out / 'g1'}"])

    players = {
        "random": PolicyConfig(kind="random"),
        "expert": PolicyConfig(kind="expert"),
        "g0": PolicyConfig(kind="vllm", path=str(checkpoint.latest(out / "g0" / "checkpoints") / checkpoint.HF_DIR)),
        "sft": PolicyConfig(kind="vllm", path=str(sft_hf)),
        "g1": PolicyConfig(kind="vllm", path=str(checkpoint.latest(out / "g1" / "checkpoints") / checkpoint.HF_DIR)),
    }
    results = {}
    for name, config in players.items():
        config = PolicyConfig(**{**config.__dict__, "max_tokens": args.max_new_tokens, "max_model_len": 1024})
        results[name] = evaluate(
            make_policy(config), args.game, episodes=args.episodes, max_steps=args.max_steps, out=out / "eval" / name
        )["mean"]

    print(f"\n{args.game}: {args.episodes} episodes x {args.max_steps} moves, seeds 0..{args.episodes - 1}")
    print(f"{'player':>8} {'score':>8} {'valid':>7} {'format':>7} {'percep':>7} {'length':>7}")
    for name, mean in results.items():
        print(
            f"{name:>8} {mean['score']:>8.1f} {1 - mean['invalid_rate']:>7.3f} {mean['format']:>7.3f} "
            f"{mean['perception']:>7.3f} {mean['length']:>7.1f}"
        )
    print_curve("sft eval loss", scalars(out / "sft" / "tensorboard", "loss/sft_eval"))
    for name in ("g0", "g1"):
        print_curve(f"{name} reward/game", scalars(out / name / "tensorboard", "reward/game"))
        print_curve(f"{name} reward/total", scalars(out / name / "tensorboard", "reward/total"))
    print(
        f"cold_start: game={args.game} "
        + " ".join(f"{name}={results[name]['score']:.1f}" for name in ("random", "expert", "g0", "g1"))
        + f" g1_valid={1 - results['g1']['invalid_rate']:.3f} sft_minutes={sft_minutes:.1f}"
        f" rl_minutes={(g0_minutes + g1_minutes) / 2:.1f}"
    )


if __name__ == "__main__":
    main()
