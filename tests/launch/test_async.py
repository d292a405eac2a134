"""The driver's faults and accounting on real Ray actors, the tiny model and real games.

- the replay buffer actor killed (Ray restarts it, empty): the rollout actors and the driver carry on, its death is not
  taken for a rollout actor's, and the groups it held are counted lost once; the driver's stop then shuts every
  engine down before it kills the actors (a quiet end of the run);
- an async run with two streaming actors conserves groups: every group made is trained, dropped (counted), lost
  (counted) or still held at the end; resumed from its checkpoint, it continues at the same step and version and
  trains on (the learner tests check that a resume restores weights and optimizer bit for bit).
"""

from __future__ import annotations

import multiprocessing
import re
import time

import pytest
from ray.exceptions import RayActorError
from test_train import SMALL, run_train
from train_runs import tensorboard_scalars

from launch import cluster
from launch.rollouts import RolloutDriver
from launch.train import load_config
from learner import checkpoint

# The smallest batch that still has two actors' worth of rounds: 2 groups of 2 short responses.
TINY = [*SMALL, "trainer.groups_per_step=2", "actors.states_per_round=2", "actors.group_size=2"]


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has ended: it only waits for its parent to read its exit status)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def fleet(ray_local, tiny_model_dir):
    """A restartable buffer and one rollout actor placed as a training run places them; removed afterwards."""
    from ray.util import get_placement_group, remove_placement_group

    config, _ = load_config([*TINY, "actors.max_new_tokens=8"])
    buffer = cluster.start_buffer(config)
    actors = cluster.start_rollouts(config, str(tiny_model_dir), gpu=False)
    yield config, buffer, actors
    for actor in [buffer, *actors.actors]:
        ray_local.kill(actor)
    remove_placement_group(get_placement_group("rollouts"))


def test_a_killed_buffer_restarts_empty_only_its_groups_are_lost_and_stop_shuts_the_engines_down(ray_local, fleet):
    config, buffer, actors = fleet
    driver = RolloutDriver(config, actors, buffer, learners=None)
    items, _ = driver.collect()  # a sync batch: one round of 2 groups
    assert len(items) == 2
    ray_local.get(actors.actors[0].run_round.remote(2))  # 2 more groups wait in the buffer
    assert driver.buffer_stats().size == 2
    incarnation = ray_local.get(actors.actors[0].get_incarnation.remote())

    ray_local.kill(buffer, no_restart=False)
    # A round whose puts meet the restarting buffer: Ray sends them to the new one; the actor does not die.
    round_ref = actors.actors[0].run_round.remote(2)
    time.sleep(0.5)
    result = ray_local.get(round_ref)
    assert result.stats.num_accepted == 2
    assert ray_local.get(actors.actors[0].get_incarnation.remote()) == incarnation

    items, metrics = driver.collect()  # the driver carries on with the new buffer (holding that round's 2 groups)
    assert len(items) == 2
    assert driver.counters() == {
        "faults/actor_restarts": 0.0,
        "faults/learner_restarts": 0.0,
        "faults/buffer_restarts": 1.0,
        "faults/lost_groups": 2.0,  # what the old buffer held, counted once
    }
    driver.buffer_stats()
    assert driver.counters()["faults/lost_groups"] == 2.0

    # The run's end: `stop` returns once every engine has shut down (its engine-core process ended), and kills the
    # actor. Killed with its engine running, an actor loses that process in any order (vLLM then prints an
    # EngineDeadError traceback at the end of the run), and Ray's kill returns before anything has ended.
    engine_cores = ray_local.get(
        actors.actors[0].__ray_call__.remote(lambda _: [p.pid for p in multiprocessing.active_children()])
    )
    assert engine_cores
    driver.stop()
    assert not [pid for pid in engine_cores if _running(pid)]
    with pytest.raises(RayActorError):
        ray_local.get(actors.actors[0].get_incarnation.remote())


def test_async_run_conserves_groups_and_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    cluster_ = ray_cluster(num_cpus=4)
    out = tmp_path / "run"
    steps = 3  # checkpoints at step 2 (checkpoint.every_steps) and at the last step
    args = [*SMALL, "actors.num=2", "trainer.mode=async", "buffer.max_staleness=2", f"output_dir={out}"]
    run = run_train([*args, f"trainer.total_steps={steps}"], env=cluster_.env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    ledger = dict(re.findall(r"(made|taken|dropped|lost|held)=(\d+)", run.stdout.split("groups:")[-1]))
    made, taken, dropped, lost, held = (int(ledger[key]) for key in ("made", "taken", "dropped", "lost", "held"))
    assert taken == steps * 4 and lost == 0
    assert made == taken + dropped + held, ledger  # nothing made went unaccounted
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["reward/total"]] == list(range(1, steps + 1))
    assert all(0 <= value <= 2 for _, value in scalars["buffer/staleness"])  # max_staleness bounds every batch
    saved = load_file(checkpoint.path_for(out / "checkpoints", steps) / "hf" / "model.safetensors")

    resumed = run_train([*args, f"trainer.total_steps={steps + 1}", "trainer.resume=true"], env=cluster_.env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"step {steps}, policy version {steps}" in resumed.stdout
    scalars = tensorboard_scalars(out / "tensorboard")
    assert sorted({step for step, _ in scalars["reward/total"]}) == list(range(1, steps + 2))
    final = load_file(checkpoint.path_for(out / "checkpoints", steps + 1) / "hf" / "model.safetensors")
    assert final.keys() == saved.keys()
    assert any(not (final[k] == saved[k]).all() for k in saved)  # it trained on from the checkpoint
