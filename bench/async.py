"""Sync vs async training: how much continuous generation with in-flight weight updates saves.

    .venv/bin/python -P bench/async.py [--steps 8] [overrides ...]

Runs `launch/train.py model=tiny` twice with the same model, game, batch and number of learner steps, first in sync
mode (generate a batch, train, broadcast) and then in async mode (the actors stream, the learner takes batches as
they fill), on one CPU for the engine and one for the learner (resources.*_cpus=1), with generation and training of
similar cost. From each run's TensorBoard files, over the steps after the first (engine and learner warm-up):

- wall: the sum of perf/step_s (the loop's own time; start-up, the same for both, is left out);
- learner idle share: the share of that time the learner waited for a batch (perf/learner_idle_share, time-weighted);
- engine idle share: the share the engine spent outside generation (perf/engine_idle_share, time-weighted);
- the sync run's phases: training = perf/update_s + perf/weight_sync_s, generation = the rest of each step.

`ideal` is the bound perfect overlap would give: sync wall / max(generation, training) of the sync run. The last line:

    async: sync_s=<s> async_s=<s> speedup=<x> ideal=<x> learner_idle=<share> engine_idle=<share>

(the idle shares are the async run's). Target: speedup >= 1.8 and >= 90% of ideal, learner_idle < 0.15, the reward
per sample no worse. Wall times on a shared machine are noisy: compare runs made at the same time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Generation and training of similar cost on one core each: 8 states x G=8 of up to 384 tokens per step against one
# fp32 update of the tiny model on those 64 responses.
COMMON = [
    "game=tetris",
    "model=tiny",
    "trainer.groups_per_step=8",
    "actors.states_per_round=8",
    "actors.group_size=8",
    "actors.max_new_tokens=384",
    "resources.actor_cpus=1",
    "resources.learner_cpus=1",
    "trainer.image_every=0",
    "checkpoint.every_steps=1000",
]
MODES = {"sync": ["trainer.mode=sync"], "async": ["trainer.mode=async", "buffer.max_staleness=2"]}


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series of a run, by step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run(mode: str, steps: int, output: Path, overrides: list[str]) -> dict[str, float]:
    """One training run of `mode`; its figures over the steps after the first."""
    args = [*COMMON, *MODES[mode], f"trainer.total_steps={steps}", f"output_dir={output / mode}", *overrides]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed (exit {proc.returncode})")
    series = {tag: values[1:] for tag, values in scalars(output / mode / "tensorboard").items()}
    step_s = series["perf/step_s"]
    wall = sum(step_s)

    def weighted(tag: str) -> float:  # a share of each step's time, over all of them
        return sum(share * s for share, s in zip(series[tag], step_s, strict=True)) / wall

    train = sum(series["perf/update_s"]) + sum(series.get("perf/weight_sync_s", []))
    figures = {
        "wall_s": wall,
        "run_s": time.perf_counter() - started,
        "learner_idle": weighted("perf/learner_idle_share"),
        "engine_idle": weighted("perf/engine_idle_share"),
        "train_s": train,
        "generation_s": wall - train,
        "reward": sum(series["reward/total"]) / len(series["reward/total"]),
        "staleness": sum(series["buffer/staleness"]) / len(series["buffer/staleness"]),
    }
    print(
        f"{mode}: {len(step_s)} steps in {wall:.1f} s ({figures['run_s']:.0f} s with start-up); learner idle "
        f"{figures['learner_idle']:.1%}, engine idle {figures['engine_idle']:.1%}; training {train:.1f} s, the rest "
        f"{wall - train:.1f} s; reward/total {figures['reward']:+.3f}, staleness {figures['staleness']:.2f}",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="learner steps of each run (the first is warm-up)")
    parser.add_argument("--output", default="runs/bench-async", help="the runs' directory")
    args, overrides = parser.parse_known_args()
    output = Path(args.output) / time.strftime("%Y%m%d-%H%M%S")
    sync = run("sync", args.steps, output, overrides)
    async_ = run("async", args.steps, output, overrides)
    ideal = sync["wall_s"] / max(sync["generation_s"], sync["train_s"])
    print(
        f"async: sync_s={sync['wall_s']:.1f} async_s={async_['wall_s']:.1f} "
        f"speedup={sync['wall_s'] / async_['wall_s']:.2f} ideal={ideal:.2f} "
        f"learner_idle={async_['learner_idle']:.3f} engine_idle={async_['engine_idle']:.3f}"
    )


if __name__ == "__main__":
    main()
