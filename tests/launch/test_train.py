"""End to end: launch/train.py as users run it, on real Ray clusters (`ray start`), the tiny model, real games.

- config errors stop the run at start-up, naming the key and the allowed values, before Ray starts;
- `ray job submit` of a 2-node cluster (two `ray start` on this machine): the job succeeds, one rollout actor ran
  on each node, TensorBoard holds every tag of design.md with one value per step, and the sync run makes exactly
  the groups it trains on (nothing dropped or lost, also with a broadcast every other step);
- a rollout actor killed mid-run is restarted and the run finishes its steps, with the loss counted
(test_async.py resumes an async run from its checkpoint).
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

from actors.models import COLD_STARTS, MODEL_NAMES
from launch.config import TrainConfig, compose
from launch.train import choose_model, load_config

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
        (["weight_sync.backend=tcp"], ["weight_sync.backend", "'auto', 'gloo', 'nccl'"]),  # not the engines' copy
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
    "actors": {"seed", "weight_transfer"},
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


@pytest.mark.parametrize("model", [name for name in MODEL_NAMES if name != "auto"])
def test_every_model_preset_composes_into_a_checked_config(model):
    """Each configs/model/<name>.yaml is valid with train.yaml (checked as launch/train.py checks it at start-up); the
    3B presets pack the learner's micro-batches by size (1.75x the tokens/s of two samples a forward on an H200:
    README)."""
    config, auto = load_config([f"model={model}"])
    assert (config.model.name, auto) == (model, False)
    assert (config.learner.micro_batch_tokens is not None) == model.startswith("qwen2_5_vl_3b")


def test_auto_on_cpu_starts_tetris_mini_from_its_cold_start():
    """The README's first command (game=tetris_mini) trains the tiny model from the cold start that taught it that
    board, with its preset's RL settings; any other Tetris stays on the plain tiny model."""
    config, auto = load_config(["game=tetris_mini"])
    assert auto and config.pool.games[0].difficulty == COLD_STARTS["tiny_g1_tetris"].difficulty
    chosen = choose_model(["game=tetris_mini"], config, auto)
    assert (chosen.model.name, chosen.pool.mode, chosen.actors.max_new_tokens) == ("tiny_g1_tetris", "continue", 160)
    assert chosen.pool.games == config.pool.games
    plain, auto = load_config(["game=tetris", "+game.tetris.difficulty.rows=10"])
    assert choose_model(["game=tetris", "+game.tetris.difficulty.rows=10"], plain, auto).model.name == "tiny"


def test_bad_config_stops_the_command_before_ray_starts():
    proc = run_train(["game=chess"], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config error" in proc.stderr and "Available options in 'game'" in proc.stderr and "tetris" in proc.stderr
    assert "Traceback" not in proc.stderr and "output dir" not in proc.stdout  # stopped before starting anything


def test_ray_job_submit_on_two_nodes_logs_every_tag_and_trains_every_group_made(ray_cluster, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cluster = ray_cluster(num_cpus=3, extra_nodes=1)
    out = tmp_path / "run"
    steps, batch = 3, 4  # SMALL: trainer.groups_per_step=4, actors.states_per_round=4
    # Each actor could make a round of 4 states; the batch needs 4 groups in all: 2 from each. Weights go out after
    # steps 2 and 3 (the last): a round made under an older version is still on-policy enough to train on.
    run = [*SMALL, "actors.num=2", "weight_sync.every_steps=2", f"trainer.total_steps={steps}", f"output_dir={out}"]
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO), "--",
         "python", "launch/train.py", *run],
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
        expected = [2, 3] if tag == "perf/weight_sync_s" else list(range(1, steps + 1))
        assert [step for step, _ in scalars[tag]] == expected, tag
    assert all(-10 < value < 100 for _, value in scalars["reward/total"])
    assert [value for _, value in scalars["rollout/groups_made"]] == [batch] * steps  # made = trained, every step
    for tag in ("buffer/dropped", "faults/lost_groups", "buffer/size", "buffer/staleness"):
        assert [value for _, value in scalars[tag]] == [0.0] * steps, tag
    for tag in ("perf/learner_idle_share", "perf/engine_idle_share"):
        assert all(0.0 < value <= 1.0 for _, value in scalars[tag]), tag
    assert {"rollout/reward_total", "perf/gen_tokens_per_s"} <= set(scalars)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("buffer/staleness")] == list(range(1, steps + 1))


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
