"""End to end: a learner rank killed mid-run (as the OOM killer would) ends its group, and launch/train.py restarts the
learner group from the latest checkpoint by itself, while the rollout actors stay up and get the restored weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from test_train import SMALL
from train_runs import read_until, start_train, tensorboard_scalars

from learner import checkpoint

# The process ids of the run's live learner ranks, asked of the cluster's state API.
LEARNER_PIDS = (
    "import json, ray; from ray.util.state import list_actors; ray.init();"
    "alive = list_actors(filters=[('class_name', '=', 'Learner'), ('state', '=', 'ALIVE')]);"
    "print(json.dumps(sorted(a.pid for a in alive)))"
)


def _learner_pids(env: dict) -> list[int]:
    query = subprocess.run([sys.executable, "-c", LEARNER_PIDS], env=env, capture_output=True, text=True, timeout=120)
    return json.loads(query.stdout.strip().splitlines()[-1])


def test_killed_learner_rank_restarts_the_group_from_the_checkpoint(ray_cluster, tmp_path):
    cluster = ray_cluster(num_cpus=4)
    out = tmp_path / "run"
    steps = 5
    # Two learner ranks of one CPU each (the tiny model's preset gives one rank both cores) and one rollout actor.
    args = [*SMALL, "learner.num=2", "resources.learner_cpus=1", f"trainer.total_steps={steps}", f"output_dir={out}"]
    driver = start_train(args, cluster.env)
    log = read_until(driver, "step     1")
    pids = _learner_pids(cluster.env)
    assert len(pids) == 2, "".join(log)[-4000:]
    # Step 3 logged: step 2's checkpoint is complete, and step 4 has just begun (its checkpoint is far off).
    log += read_until(driver, "step     3")
    os.kill(pids[-1], signal.SIGKILL)  # one rank of the two
    log.extend(driver.stdout)
    output = "".join(log)
    assert driver.wait(timeout=600) == 0, output[-4000:]

    restart = output[output.index("restarting the learner group (1/3)") :]  # raises if there was none
    assert "died" in output[: len(output) - len(restart)], output[-4000:]
    assert f"resumed from {checkpoint.path_for(out / 'checkpoints', 2)}: step 2" in restart, restart[-4000:]
    assert "weight-sync group rebuilt (restarted: [])" in restart  # the same actors, a new sender of every weight
    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["faults/learner_restarts"][-1] == (steps, 1.0)
    assert scalars["faults/actor_restarts"][-1][1] == 0  # the rollout actors stayed up
    assert [step for step, _ in scalars["reward/total"]] == [1, 2, 3, 3, 4, 5]  # on from the checkpoint's step 2
    assert checkpoint.read_state(checkpoint.latest(out / "checkpoints"))["step"] == steps
