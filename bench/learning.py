"""Does it learn? Trains the tiny model on CPU for a wall-clock budget and prints the reward curve.

    .venv/bin/python -P bench/learning.py                    # tetris, 15 minutes at most
    .venv/bin/python -P bench/learning.py --minutes 5 game=2048

Runs `launch/train.py model=tiny` (extra arguments are passed on as overrides), reads the run's TensorBoard files,
prints the mean total / format / perception reward every few steps, writes the curve as a PNG, and ends with
`learning: first=<mean total reward, first 10% of steps> last=<same, last 10%> minutes=<wall>`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PARTS = ("total", "format", "perception", "game")


def read_curves(log_dir: Path) -> dict[str, list[float]]:
    """reward/<part> per step, from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {part: [e.value for e in events.Scalars(f"reward/{part}")] for part in PARTS}


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(curves["total"]) + 1)
    for part in ("total", "format", "perception"):
        ax.plot(steps, curves[part], label=f"reward/{part}")
    ax.set_xlabel("learner step")
    ax.set_ylabel("mean reward per response")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the training run")
    parser.add_argument("--steps", type=int, default=1000, help="step limit (the budget usually ends the run first)")
    parser.add_argument("--output", default="runs/bench-learning", help="the run's output directory")
    parser.add_argument("--png", default="bench/results/learning_curve.png", help="where the curve goes")
    args, overrides = parser.parse_known_args()

    out = (REPO / args.output).resolve()
    command = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "model=tiny",
        f"trainer.total_steps={args.steps}",
        f"trainer.max_minutes={args.minutes}",
        f"output_dir={out}",
        *overrides,
    ]
    print("running:", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    minutes = (time.perf_counter() - start) / 60

    curves = read_curves(out / "tensorboard")
    total = np.array(curves["total"])
    every = max(1, len(total) // 20)
    print(f"{'step':>5} {'total':>8} {'format':>8} {'perception':>10}")
    for i in range(0, len(total), every):
        print(f"{i + 1:>5} {total[i]:>8.3f} {curves['format'][i]:>8.3f} {curves['perception'][i]:>10.3f}")
    tenth = max(1, len(total) // 10)
    first, last = total[:tenth].mean(), total[-tenth:].mean()
    png = (REPO / args.png).resolve()
    plot(curves, png, f"tiny Qwen2.5-VL on CPU, {' '.join(overrides) or 'game=tetris'}: {len(total)} steps")
    print(f"curve: {png}")
    print(f"learning: first={first:.3f} last={last:.3f} steps={len(total)} minutes={minutes:.1f}")


if __name__ == "__main__":
    main()
