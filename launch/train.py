"""Trains a vision-language model on VLM-Gym games with GRPO, across a Ray cluster.

    python launch/train.py game=tetris                      # local Ray (or the running cluster), model=auto
    ray job submit --working-dir . -- python launch/train.py game=2048 actors.num=8 trainer.mode=async

Reads top to bottom: configure, connect, place the actors, then loop (generate -> train -> broadcast weights ->
log -> checkpoint). The pieces it drives:

    actors.RolloutActor x actors.num   game pool + vLLM engine: states -> G responses -> scored TrajectoryGroups
    replay.ReplayBuffer                  holds references to the groups; back-pressure and staleness bounds
    learner.LearnerGroup                 DeepSpeed ZeRO-3 ranks: GRPO update, weight broadcast, checkpoints
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from ray.util.placement_group import PlacementGroup

from actors.models import auto_model_name, resolve_model
from launch import cluster
from launch.config import TrainConfig, compose, resolve
from launch.monitor import Monitor, batch_metrics
from launch.rollouts import RolloutDriver
from learner import LearnerDiedError, LearnerGroup, checkpoint

logger = logging.getLogger("train")

# Learner groups lost (a rank died) in a row, without a step completed in between, before the run gives up.
LEARNER_RESTARTS = 3


def load_config(overrides: list[str]) -> tuple[TrainConfig, bool]:
    """Composes and checks the config. `model=auto` is decided later (it needs the cluster), so it is checked here
    as model=tiny; returns whether it was auto. `model.name=X` is taken as the group choice `model=X`."""
    overrides = [f"model={o.split('=', 1)[1]}" if o.startswith("model.name=") else o for o in overrides]
    auto = not any(o.startswith("model=") for o in overrides) or "model=auto" in overrides
    concrete = [o for o in overrides if o != "model=auto"] + (["model=tiny"] if auto else [])
    return resolve(compose(concrete)), auto


def choose_model(overrides: list[str], config: TrainConfig, auto: bool) -> TrainConfig:
    """model=auto: on a cluster without GPUs the tiny local model, cold-started where the run plays the game of one of
    its cold starts (2048: tiny_g1; game=tetris_mini: tiny_g1_tetris; said in one line); Qwen2.5-VL-3B with them."""
    if not auto or (name := auto_model_name(config.pool.games)) == "tiny":  # composed as tiny
        return config
    return resolve(compose([o for o in overrides if o != "model=auto"] + [f"model={name}"]))


def start_learners(
    config: TrainConfig, placement: PlacementGroup, gpu: bool, ckpt_root: Path, restore: bool
) -> tuple[LearnerGroup, int, int]:
    """A new learner group (one DeepSpeed world); with `restore`, restored from the latest checkpoint under
    `ckpt_root`, else, or when there is none yet, with the model's initial weights.

    Returns:
        The group, and the step and policy version it starts from.
    """
    learners = LearnerGroup(
        config.learner,
        config.grpo,
        config.weight_sync,
        placement_group=placement,
        num_cpus=config.resources.learner_cpus,
        use_gpu=gpu,
    )
    if not restore:
        return learners, 0, 0
    latest = checkpoint.latest(ckpt_root)
    if latest is None:
        print(f"no checkpoint under {ckpt_root}: starting from step 0 with the initial weights")
        return learners, 0, 0
    state = learners.load_checkpoint(str(latest))
    print(f"resumed from {latest}: step {state['step']}, policy version {state['version']}")
    return learners, state["step"], state["version"]


def restart_learners(
    config: TrainConfig, placement: PlacementGroup, gpu: bool, ckpt_root: Path, rollouts: RolloutDriver
) -> tuple[LearnerGroup, int, int]:
    """Replaces a learner group that died by a new one restored from the latest checkpoint (the initial weights when
    there is none yet). The rollout actors stay up: a new weight-sync group gives them every restored weight.

    The restored weights go out as a new policy version, one above the learner's last (`RolloutDriver.learner_version`,
    the run's one counter): versions only increase (the buffer measures staleness by them), and the groups made by the
    lost weights are then older than the restored ones.

    Returns:
        The new group, the checkpoint's step (the loop goes on from there), and the version the engines now hold.
    """
    learners, step, _ = start_learners(config, placement, gpu, ckpt_root, restore=True)
    version = rollouts.replace_learners(learners)
    rollouts.sync_weights(version)
    return learners, step, version


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, auto = load_config(overrides)  # a bad key stops here, before Ray or any actor starts
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if not config.trainer.verbose:
        cluster.quiet_driver()
    where = cluster.connect(cluster.cpus_needed(config), config.trainer.verbose, cluster.socket_env(config))
    config = choose_model(overrides, config, auto)
    gpu = cluster.use_gpu(config)
    model = resolve_model(config.model.name, config.model.path)
    config = dataclasses.replace(config, learner=dataclasses.replace(config.learner, model_dir=model.path))
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"output dir: {out}  (tensorboard --logdir {out / 'tensorboard'})  ray: {where}  model: {model.name}")

    # ---- place the actors: buffer, learner group (one DeepSpeed world), rollout actors (one vLLM engine each);
    # trainer.resume: weights, optimizer, step and version from the latest checkpoint of this output dir
    buffer = cluster.start_buffer(config)
    ckpt_root = out / config.checkpoint.dir
    learner_placement = cluster.learner_placement(config, gpu)
    learners, step, version = start_learners(config, learner_placement, gpu, ckpt_root, config.trainer.resume)
    ray.get(buffer.set_policy_version.remote(version))
    fleet = cluster.start_rollouts(config, model, gpu)
    learners.init_weight_sync(fleet.actors, workers_per_engine=config.actors.tp)
    rollouts = RolloutDriver(config, fleet, buffer, learners)
    rollouts.sync_weights(version)  # engines start from the learner's weights (the checkpoint's after a resume)

    monitor = Monitor(out, config.to_dict(), config.trainer.total_steps, start_step=step)
    started = time.perf_counter()
    budget_s = (config.trainer.max_minutes or float("inf")) * 60
    last_step = config.trainer.total_steps
    learner_losses = 0  # learner groups lost (a rank died) since the last completed step
    try:
        while step < last_step:
            t0 = time.perf_counter()
            try:
                if learners is None:  # the group died: a new one from the latest checkpoint, on from its step
                    learners, step, version = restart_learners(config, learner_placement, gpu, ckpt_root, rollouts)
                # 1. generate: rounds until the buffer holds a batch (sync), or a batch from the actors' streams (async)
                items, round_metrics = rollouts.collect()
                # 2. train: one GRPO update on B groups, sharded over the learner ranks
                metrics = learners.update(items)
                if metrics.get("learner/skipped_update"):  # some groups died with their actor: no step this time
                    rollouts.lost_groups += len(items)
                    continue
                step += 1
                rollouts.learner_stepped(step)  # the learner's weights are a new policy version
                if time.perf_counter() - started > budget_s:
                    last_step = step  # out of time: this step is the last (broadcast, log, checkpoint)
                # 3. broadcast the new weights to every engine (ZeRO-3 gather, bucketed; async: while they generate)
                if step % config.weight_sync.every_steps == 0 or step == last_step:
                    version = rollouts.learner_version  # the step, unless a learner restart went back to an older one
                    metrics["perf/weight_sync_s"] = rollouts.sync_weights(version).total_s
                # 4. log
                scalars, histograms = batch_metrics(items, rollouts.buffer_stats())
                metrics.update(round_metrics)
                metrics.update(scalars)
                metrics.update(rollouts.counters())
                metrics["perf/step_s"] = time.perf_counter() - t0
                monitor.log_step(step, metrics, histograms)
                if config.trainer.image_every and step % config.trainer.image_every == 0:
                    try:
                        monitor.log_sample(step, ray.get(items[0].ref))
                    except ray.exceptions.ObjectLostError:  # its actor died since the learner read it: no image
                        pass
                # 5. checkpoint (atomic: a killed run resumes from the last complete one)
                if config.checkpoint.due(step) or step == last_step:
                    learners.save_checkpoint(str(ckpt_root), config.to_dict(), config.checkpoint.keep_last)
                learner_losses = 0
            except LearnerDiedError as e:  # killed, out of memory: the other ranks were ended with it
                learner_losses += 1
                if learner_losses > LEARNER_RESTARTS:
                    raise
                logger.warning("%s; restarting the learner group (%d/%d)", e, learner_losses, LEARNER_RESTARTS)
                learners = None
    finally:
        monitor.close()
        rollouts.stop()
    groups = " ".join(f"{key}={value}" for key, value in rollouts.ledger().items())
    print(f"done: {step} steps, policy version {version}; groups: {groups}; logs in {monitor.log_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
