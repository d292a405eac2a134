"""Sync vs async training: how much continuous generation with in-flight weight updates saves.

    .venv/bin/python -P bench/async.py [--steps 6] [overrides ...]

Runs `launch/train.py model=tiny` twice with the same model, game, batch and number of learner steps, first in sync
mode (generate a batch, train, broadcast) and then in async mode (the actors stream, the learner takes batches as
they fill), on one CPU for the engine and one for the learner (resources.*_cpus=1, and each pinned to its core:
`Pinner`), with generation and training of similar cost. From each run's TensorBoard files, over the steps after the
first (engine and learner warm-up):

- wall: the sum of perf/step_s (the loop's own time; start-up, the same for both, is left out);
- learner idle share: the share of that time the learner waited for a batch (perf/learner_idle_share, time-weighted);
- engine idle share: the share the engine spent outside generation (perf/engine_idle_share, time-weighted);
- the sync run's phases: training = perf/update_s + perf/weight_sync_s, generation = the rest of each step.

`ideal` is the bound perfect overlap would give: sync wall / max(generation, training) of the sync run. The last line:

    async: sync_s=<s> async_s=<s> speedup=<x> ideal=<x> learner_idle=<share> engine_idle=<share>

(the idle shares are the async run's). Target: speedup >= 1.8 and >= 90% of ideal, learner_idle < 0.15, the reward
per sample no worse. Each run's line also gives the groups made and dropped (stale groups are wasted generation)
and the 1-minute load before and after it: async overlaps two busy cores, so any other job on the machine takes from
it what sync, one busy core at a time, hardly misses. Compare runs made at the same time, on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
# Generation and training of similar cost on one core each: 4 states x G=8 of up to 1,024 tokens per step (a ~430-token
# prompt: the context is 2,048) against one fp32 update of the tiny model on those 32 responses. Decoding costs more
# per engine step than per sequence, so fewer, longer responses weigh generation up against training: 8 x 8 of up to
# 384 tokens made training 1.6 times generation (ideal 1.63); this takes as many CPU seconds in each (a sync run:
# learner 31.8 s, engine 30.6 s over 3 steps).
COMMON = [
    "game=tetris",
    "model=tiny",
    "trainer.groups_per_step=4",
    "actors.states_per_round=4",
    "actors.group_size=8",
    "actors.max_new_tokens=1024",
    "actors.max_model_len=2048",
    "resources.actor_cpus=1",
    "resources.learner_cpus=1",
    "trainer.image_every=0",
    "checkpoint.every_steps=1000",
]
MODES = {"sync": ["trainer.mode=sync"], "async": ["trainer.mode=async", "buffer.max_staleness=2"]}
PIN_POLL_S = 0.5  # how often the pinner looks for the run's new processes and threads


class Pinner(threading.Thread):
    """Holds a run's engine to one core and its learner to another, for as long as the run lives.

    Ray reserves a CPU per actor (resources.*_cpus=1, OMP_NUM_THREADS=1) but binds nothing: the rollout actor's
    threads and its vLLM engine-core process could borrow the learner's core and the other way round, so "one core
    each" would not be what the async run measures. Every poll pins every thread of the run's processes by their Ray
    titles: the rollout actor (`ray::RolloutActor...`, `ray::rollout-0:...`) and its descendants (vLLM's
    `VLLM::EngineCore`) to `engine_core`, the learner (`ray::Learner...`) to `learner_core` (threads started between
    two polls inherit their creator's core). The driver, the buffer and Ray's own daemons stay unpinned.
    """

    def __init__(self, root: int, engine_core: int, learner_core: int) -> None:
        super().__init__(name="pinner", daemon=True)
        self.root, self.cores = psutil.Process(root), {"engine": engine_core, "learner": learner_core}
        self.pinned: dict[str, set[int]] = {"engine": set(), "learner": set()}  # role -> pids
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(PIN_POLL_S):
            try:
                processes = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for process in processes:
                if (role := _role(process)) is not None:
                    for member in [process, *_children(process)]:
                        self._pin(role, member)

    def _pin(self, role: str, process: psutil.Process) -> None:
        try:
            threads = process.threads()
        except psutil.Error:
            return  # ended meanwhile
        for thread in threads:
            try:
                os.sched_setaffinity(thread.id, {self.cores[role]})
            except OSError:
                continue  # the thread ended meanwhile
        self.pinned[role].add(process.pid)


def _role(process: psutil.Process) -> str | None:
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return None
    if title.startswith("ray::Learner"):
        return "learner"
    if title.startswith("ray::") and ("RolloutActor" in title or title.startswith("ray::rollout-")):
        return "engine"
    return None


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series of a run, by step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run(mode: str, steps: int, output: Path, overrides: list[str]) -> dict[str, float]:
    """One training run of `mode`; its figures over the steps after the first."""
    args = [*COMMON, *MODES[mode], f"trainer.total_steps={steps}", f"output_dir={output / mode}", *overrides]
    load_before, started = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, text=True)
    pinner = None
    if len(cores := sorted(os.sched_getaffinity(0))) >= 2:
        pinner = Pinner(proc.pid, engine_core=cores[0], learner_core=cores[1])
        pinner.start()
    returncode = proc.wait()
    if pinner is not None:
        pinner.done.set()
        pinner.join()
    if returncode != 0:
        sys.exit(f"{mode} run failed (exit {returncode})")
    pinned = (
        "not pinned (fewer than 2 cores)"
        if pinner is None
        else ", ".join(
            f"{role} pids {sorted(pids)} on core {pinner.cores[role]}" for role, pids in pinner.pinned.items()
        )
    )
    every = scalars(output / mode / "tensorboard")
    series = {tag: values[1:] for tag, values in every.items()}
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
    made = sum(every["rollout/groups_made"])  # over every step, the first included
    dropped = every["buffer/dropped"][-1]  # the buffer's running count
    print(
        f"{mode}: {len(step_s)} steps in {wall:.1f} s ({figures['run_s']:.0f} s with start-up); learner idle "
        f"{figures['learner_idle']:.1%}, engine idle {figures['engine_idle']:.1%}; training {train:.1f} s, the rest "
        f"{wall - train:.1f} s; reward/total {figures['reward']:+.3f}, staleness {figures['staleness']:.2f}; groups "
        f"made {made:.0f}, dropped {dropped:.0f}; load {load_before:.2f} -> {os.getloadavg()[0]:.2f}; {pinned}",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="learner steps of each run (the first is warm-up)")
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
