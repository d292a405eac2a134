"""End to end: launch/train.py as users run it, on real Ray clusters (`ray start`), the tiny model, real games.

- config errors stop the run at start-up, naming the key and the allowed values, before Ray starts;
- `ray job submit` of a 2-node cluster (two `ray start` on this machine): the job succeeds, one rollout actor ran
  on each node, and TensorBoard holds every tag of design.md with one value per step;
- a rollout actor killed mid-run is restarted and the run finishes its steps, with the loss counted;
- a run resumed from its checkpoint (here in async mode) continues at the same step and version and trains on
  (the learner tests check that a resume restores weights and optimizer bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from train_runs import REPO, read_until, start_train, tensorboard_scalars

from launch.config import TrainConfig, compose
from launch.train import load_config
from learner import checkpoint

TRAIN = str(REPO / "launch" / "train.py")
# A small run of the tiny model: 4 groups x G=4 per step, short responses.
SMALL = [
    "game=tetris",
    "model=tiny",
    "trainer.groups_per_step=4",
    "actors.states_per_round=4",
    "actors.group_size=4",
    "actors.max_new_tokens=16",
    "checkpoint.every_steps=2",
    "trainer.image_every=1",
]
DESIGN_TAGS = [
    "reward/total",
    "reward/game",
    "reward/format",
    "reward/perception",
    "loss/policy",
    "loss/kl",
    "policy/entropy",
    "policy/clip_fraction",
    "optim/grad_norm",
    "optim/lr",
    "perf/step_s",
    "perf/gen_tokens_per_s",
    "perf/env_steps_per_s",
    "perf/weight_sync_s",
    "buffer/size",
    "buffer/staleness",
    "policy/logprob_diff",
    "policy/is_mean",
    "policy/is_max",
    "policy/is_truncated_share",
]


def run_train(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["actors.group_size=0"], ["actors", "group_size", "integer >= 1"]),
        (["trainer.mode=sometimes"], ["trainer.mode", "sync, async"]),
        (["+trainer.epochs=3"], ["trainer.epochs", "allowed keys", "total_steps"]),
        (["+game.tetris.difficulty.rows=2"], ["rows", "[6, 40]"]),
        (["game=2048", "+game.2048.difficulty.icon_style=ascii"], ["icon_style", "'glyph', 'texture', 'photo'"]),
        (["learner.num=2", "trainer.groups_per_step=3"], ["trainer.groups_per_step", "learner.num"]),
        (["buffer.capacity=8"], ["buffer.capacity", "trainer.groups_per_step"]),
    ],
)
def test_bad_config_names_the_key_and_the_allowed_values(overrides, names):
    with pytest.raises(ValueError) as error:
        load_config(overrides)
    for name in names:
        assert name in str(error.value)


# Not settings of a run: filled in by launch.config.resolve from other keys (the top-level seed, the game group, the
# model, max_new_tokens), or, for buffer.get_timeout_s, the buffer API's default for callers that pass no timeout (the
# training loop passes trainer.round_timeout_s).
DERIVED = {
    "pool": {"games", "seed"},
    "actors": {"seed"},
    "learner": {"seed", "model_dir", "max_response_len", "temperature"},
    "buffer": {"get_timeout_s"},
}


def test_every_setting_can_be_overridden_on_the_command_line():
    """Hydra overrides only keys that the composed config already has: a dataclass field missing from configs/ could
    be set only as `+key=value`, unlike what the README documents."""
    composed = OmegaConf.to_container(compose(["model=tiny"]))
    for section, cls in typing.get_type_hints(TrainConfig).items():
        if dataclasses.is_dataclass(cls):
            expected = {f.name for f in dataclasses.fields(cls)} - DERIVED.get(section, set())
            assert expected <= set(composed[section]), (section, sorted(expected - set(composed[section])))
    config, _ = load_config(["weight_sync.timeout_s=60", "grpo.entropy_coef=0.01", "learner.betas=[0.9,0.99]"])
    assert (config.weight_sync.timeout_s, config.grpo.entropy_coef, config.learner.betas) == (60, 0.01, (0.9, 0.99))


def test_bad_config_stops_the_command_before_ray_starts():
    proc = run_train(["game=chess"], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config error" in proc.stderr and "Available options in 'game'" in proc.stderr and "tetris" in proc.stderr
    assert "Traceback" not in proc.stderr and "output dir" not in proc.stdout  # stopped before starting anything


def test_ray_job_submit_on_two_nodes_logs_every_tag_each_step(ray_cluster, tmp_path):
    cluster = ray_cluster(num_cpus=3, extra_nodes=1)
    out = tmp_path / "run"
    steps = 3
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO), "--",
         "python", "launch/train.py", *SMALL, "actors.num=2", f"trainer.total_steps={steps}", f"output_dir={out}"],
        env=cluster.env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert submit.returncode == 0 and "succeeded" in submit.stdout + submit.stderr, submit.stdout[-4000:]

    # One rollout actor on each node (the state API remembers where the run's actors lived).
    query = (
        "import json, ray; from ray.util.state import list_actors; ray.init();"
        "print(json.dumps([a.node_id for a in list_actors(filters=[('class_name', '=', 'RolloutActor')])]))"
    )
    nodes = subprocess.run([sys.executable, "-c", query], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert len(set(json.loads(nodes.stdout.strip().splitlines()[-1]))) == 2, nodes.stdout + nodes.stderr

    scalars = tensorboard_scalars(out / "tensorboard")
    for tag in DESIGN_TAGS:
        assert [step for step, _ in scalars[tag]] == list(range(1, steps + 1)), tag
    assert all(-10 < value < 100 for _, value in scalars["reward/total"])


def test_killed_rollout_actor_is_restarted_and_the_run_finishes(ray_cluster, tmp_path):
    cluster = ray_cluster(num_cpus=4)
    out = tmp_path / "run"
    steps = 10  # enough that the run is still going when the kill lands (a step of 2 + 2 groups takes seconds)
    args = [*SMALL, "actors.num=2", f"trainer.total_steps={steps}", f"output_dir={out}"]
    driver = start_train(args, cluster.env)
    log = read_until(driver, "step     2")  # the run is training: kill an actor's process
    kill = "import ray; ray.init(namespace='vlm-gym-rl');ray.kill(ray.get_actor('rollout-1'), no_restart=False)"
    subprocess.run([sys.executable, "-c", kill], env=cluster.env, check=True, timeout=120)
    log.extend(driver.stdout)
    assert driver.wait(timeout=600) == 0, "".join(log)[-4000:]

    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["reward/total"]] == list(range(1, steps + 1))  # training went on
    output = "".join(log)
    assert scalars["faults/actor_restarts"][-1][1] >= 1
    assert "rollout-1 was restarted" in output
    assert "weight-sync group rebuilt (restarted: ['rollout-1'])" in output  # it got the current weights
    if "died during a round" in output:  # killed mid-round (rather than between rounds): its round is counted lost
        assert scalars["faults/lost_groups"][-1][1] >= 2  # its share of the batch: 4 groups over 2 actors


def test_resume_continues_from_the_checkpoint_in_async_mode(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    cluster = ray_cluster(num_cpus=3)
    out = tmp_path / "run"
    first = run_train([*SMALL, "trainer.total_steps=2", f"output_dir={out}"], env=cluster.env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = load_file(checkpoint.path_for(out / "checkpoints", 2) / "hf" / "model.safetensors")

    resumed = run_train([*SMALL, "trainer.total_steps=4", "trainer.resume=true", f"output_dir={out}"], env=cluster.env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 2, policy version 2" in resumed.stdout
    scalars = tensorboard_scalars(out / "tensorboard")
    assert sorted({step for step, _ in scalars["reward/total"]}) == [1, 2, 3, 4]
    final = load_file(checkpoint.path_for(out / "checkpoints", 4) / "hf" / "model.safetensors")
    assert final.keys() == saved.keys()
    assert any(not (final[k] == saved[k]).all() for k in saved)  # it trained on from the checkpoint
