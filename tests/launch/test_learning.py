"""It learns: a short run of the tiny model on Tetris raises the reward it is trained on.

A randomly initialized model writes a tag about once in fifty responses; GRPO with the per-tag format reward makes it
write them far more often within a few steps. The long version of this run, with its curve, is bench/learning.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from train_runs import REPO, tensorboard_scalars

STEPS = 15


def test_a_short_run_raises_the_format_and_total_reward(ray_cluster, tmp_path):
    cluster = ray_cluster(num_cpus=3)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "game=tetris", "model=tiny",
         f"trainer.total_steps={STEPS}", "checkpoint.every_steps=0", f"output_dir={out}"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    scalars = tensorboard_scalars(out / "tensorboard")
    fmt = np.array([value for _, value in scalars["reward/format"]])
    total = np.array([value for _, value in scalars["reward/total"]])
    assert len(fmt) == STEPS
    first, last = fmt[:3].mean(), fmt[-3:].mean()
    assert last > first + 0.03 and last > 2 * first, fmt.round(3)
    assert total[-3:].mean() > total[:3].mean() + 0.03, total.round(3)
