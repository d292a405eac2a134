"""G1's perception-enhanced cold start: collect teacher responses, keep the well-perceived ones, fine-tune on them.

    python launch/sft.py game=2048                                    # the expert teaches the tiny model (CPU)
    python launch/sft.py game=2048 teacher.kind=vllm teacher.path=<model dir> collect.states=5000
    python launch/train.py game=2048 model.path=<output_dir>/checkpoints/step-<n>/hf   # then RL continues (G1)

Reads top to bottom, like launch/train.py, and shares its pieces:

    collect   states drawn as training draws them (envs.GamePool: reset + the game's random steps)
              -> teacher.respond (actors.policies: expert, vllm, openai) -> G1's filter: the perception block
              matches the board (exact, or at least `min_perception` of the cells) and the action is legal
              -> a dataset directory (learner.sft: parquet with PNG boards, `datasets`-loadable; kept/rejected counts)
    train     learner.LearnerGroup (the RL run's DeepSpeed ZeRO-3 ranks): `sft_update` per batch, cosine schedule,
              eval loss on the held-out split, TensorBoard (launch.monitor)
    save      one checkpoint (learner.checkpoint): its hf/ is what `launch/train.py model.path=...` and
              `launch/eval.py policy=vllm` load
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import ray
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actors.models import auto_model_name, resolve_model
from actors.policies import Policy, PolicyConfig, make_policy
from actors.tiny_model import cached_build
from envs import GamePool
from envs.rewards import perception_reward
from launch import cluster
from launch.config import TrainConfig, _build, _require, compose, resolve
from launch.monitor import Monitor
from learner import LearnerGroup, checkpoint
from learner.sft import SFTExample, cosine_lr, png_bytes, read_split, read_stats, write_split, write_stats

logger = logging.getLogger("sft")
FILTERS = ("exact", "cells")
PLAYER_IS_TEACHER = "teacher"  # player.kind: the teacher's own answers move the games on


@dataclass(frozen=True)
class CollectConfig:
    """Teacher trajectories and G1's filter (the `collect` section)."""

    states: int = 2000
    """States drawn; each gets one teacher response."""
    batch: int = 64
    """States per teacher call."""
    perception: str = "exact"
    """exact: the ground-truth board text verbatim in <perception> (G1); cells: a share of the cells read right."""
    min_perception: float = 1.0
    """With perception=cells: keep responses reading at least this share of the cells right."""
    validation_fraction: float = 0.05
    """Share of the kept examples held out for the eval loss (at least one)."""
    dataset: str | None = None
    """A dataset directory collected before: train on it, collect nothing."""

    def validate(self) -> CollectConfig:
        _require(self.states >= 2, "collect.states", "an integer >= 2", self.states)
        _require(self.batch >= 1, "collect.batch", "an integer >= 1", self.batch)
        _require(self.perception in FILTERS, "collect.perception", f"one of {', '.join(FILTERS)}", self.perception)
        _require(0.0 <= self.min_perception <= 1.0, "collect.min_perception", "a number in [0, 1]", self.min_perception)
        fraction = self.validation_fraction
        _require(0.0 < fraction < 1.0, "collect.validation_fraction", "a number in (0, 1)", fraction)
        return self


@dataclass(frozen=True)
class SFTConfig:
    """The supervised schedule (the `sft` section)."""

    epochs: int = 3
    """Passes over the training split."""
    batch_size: int = 32
    """Examples per optimizer step; a multiple of learner.num (a last, smaller batch is dropped)."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr x this."""
    eval_every: int = 20
    """Eval loss on the held-out split every this many steps (and after the last)."""

    def validate(self) -> SFTConfig:
        _require(self.epochs >= 1, "sft.epochs", "an integer >= 1", self.epochs)
        _require(self.batch_size >= 1, "sft.batch_size", "an integer >= 1", self.batch_size)
        _require(self.lr > 0, "sft.lr", "a number > 0", self.lr)
        _require(self.warmup_steps >= 0, "sft.warmup_steps", "an integer >= 0", self.warmup_steps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "sft.min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        _require(self.eval_every >= 1, "sft.eval_every", "an integer >= 1", self.eval_every)
        return self


@dataclass(frozen=True)
class ColdStartConfig:
    """The training run's config (game, model, learner, ...) and the cold start's own sections."""

    run: TrainConfig
    teacher: PolicyConfig
    player: PolicyConfig | None  # None: the teacher's own answers move the games on
    collect: CollectConfig
    sft: SFTConfig

    def to_dict(self) -> dict[str, Any]:
        player = {"kind": PLAYER_IS_TEACHER} if self.player is None else dataclasses.asdict(self.player)
        return {
            **self.run.to_dict(),
            **{k: dataclasses.asdict(getattr(self, k)) for k in ("teacher", "collect", "sft")},
            "player": player,
        }


def load_config(overrides: list[str]) -> ColdStartConfig:
    """Composes configs/sft.yaml and checks it. `model=auto` is decided here, as launch/train.py decides it."""
    overrides = [f"model={o.split('=', 1)[1]}" if o.startswith("model.name=") else o for o in overrides]
    if not any(o.startswith("model=") for o in overrides) or "model=auto" in overrides:
        overrides = [o for o in overrides if o != "model=auto"] + [f"model={auto_model_name()}"]
    raw = OmegaConf.to_container(compose(overrides, "sft"), resolve=True)
    sections = {key: raw.pop(key, None) or {} for key in ("teacher", "player", "collect", "sft")}
    player = sections["player"]
    config = ColdStartConfig(
        run=resolve(raw),
        teacher=_build(PolicyConfig, sections["teacher"], "teacher"),
        player=None if player.get("kind") == PLAYER_IS_TEACHER else _build(PolicyConfig, player, "player"),
        collect=_build(CollectConfig, sections["collect"], "collect"),
        sft=_build(SFTConfig, sections["sft"], "sft"),
    )
    _require(
        config.sft.batch_size % config.run.learner.num == 0,
        "sft.batch_size",
        f"a multiple of learner.num ({config.run.learner.num})",
        config.sft.batch_size,
    )
    _require(
        config.player is None or config.run.pool.mode == "continue",
        "player.kind",
        f"{PLAYER_IS_TEACHER} unless pool.mode=continue (only then does a player move the games on)",
        None if config.player is None else config.player.kind,
    )
    return config


# ----------------------------------------------------------------------------------------------------- collect


def collect(
    pool: GamePool, teacher: Policy, config: CollectConfig, player: Policy | None = None
) -> tuple[list[SFTExample], dict[str, int]]:
    """G1's teacher trajectories: one teacher response per state, kept when it sees the board right and acts legally.

    With the pool in mode "continue" (`pool.mode=continue`) each slot's game then moves on, so the states are those
    that play leads to (after the pool's reset and random steps), not only fresh random boards. Whose play: the
    teacher's own answers by default, so a student learns the teacher's strategy where it applies it; or `player`'s
    (DAgger: the student plays, an illegal move of its own is replaced by a random legal one as `pool.advance` does,
    and the teacher labels every state it reaches), so a student also learns what to do on the boards its own
    mistakes lead to, which the teacher's play never shows it. Batches are then at most `pool.num_games` states.

    Returns:
        The kept examples, and the counts: `states`, `kept`, `rejected_no_reply` (the teacher failed or answered
        nothing), `rejected_invalid_action` (no legal action), `rejected_perception` (the board misread); with a
        player, `player_illegal` (its moves that were not legal).
    """
    kept: list[SFTExample] = []
    counts = Counter(states=0, kept=0, rejected_no_reply=0, rejected_invalid_action=0, rejected_perception=0)
    if player is not None:
        counts["player_illegal"] = 0
    batch = min(config.batch, pool.num_games) if pool.mode == "continue" else config.batch
    while counts["states"] < config.states:
        states = pool.sample(min(batch, config.states - counts["states"]))
        games = [state.game for state in states]
        responses = teacher.respond(games)
        moves = responses if player is None else player.respond(games)
        for state, response, move in zip(states, responses, moves, strict=True):
            counts["states"] += 1
            if player is not None:
                counts["player_illegal"] += state.game.parse_action(move) not in state.game.legal_actions()
            if pool.mode == "continue":
                pool.advance(state, move)  # the state's own snapshot is not touched
            reason = _rejection(state.game, state.text_observation, response, config)
            if reason:
                counts[f"rejected_{reason}"] += 1
                continue
            counts["kept"] += 1
            [reward] = pool.score(state, [response])
            kept.append(
                SFTExample(
                    game=state.game_name,
                    state_id=state.state_id,
                    image=png_bytes(state.image),
                    prompt=state.prompt,
                    response=response,
                    text_observation=state.text_observation,
                    perception=perception_reward(response, state.text_observation, config.perception),
                    game_reward=reward.game,
                )
            )
    return kept, dict(counts)


def _rejection(game, truth: str, response: str, config: CollectConfig) -> str | None:
    """Why G1's filter drops a response (a key of `collect`'s counts), or None when it keeps it."""
    if not response:
        return "no_reply"
    if game.parse_action(response) not in game.legal_actions():
        return "invalid_action"
    seen = perception_reward(response, truth, config.perception)
    if seen < (1.0 if config.perception == "exact" else config.min_perception):
        return "perception"
    return None


def collect_dataset(config: ColdStartConfig, directory: Path) -> dict[str, Any]:
    """Collects the dataset into `directory` (train and validation splits, stats.json); returns the stats."""
    start = time.perf_counter()
    with contextlib.ExitStack() as policies:  # a vllm policy's engine: its memory goes to the learners that train next

        def opened(policy: PolicyConfig) -> Policy:
            return policies.enter_context(contextlib.closing(make_policy(policy)))

        teacher = opened(config.teacher)
        player = None if config.player is None else opened(config.player)
        examples, counts = collect(GamePool.from_config(config.run.pool), teacher, config.collect, player)
    if len(examples) < 2:
        raise RuntimeError(f"the teacher's responses left {len(examples)} examples after G1's filter: {counts}")
    order = np.random.default_rng(config.run.seed).permutation(len(examples))
    held_out = max(1, round(len(examples) * config.collect.validation_fraction))
    write_split(directory, "validation", [examples[i] for i in order[:held_out]])
    write_split(directory, "train", [examples[i] for i in order[held_out:]])
    stats = {
        "teacher": teacher.name,
        "player": teacher.name if player is None else player.name,
        "filter": {"perception": config.collect.perception, "min_perception": config.collect.min_perception},
        "games": sorted({e.game for e in examples}),
        **counts,
        "train": len(examples) - held_out,
        "validation": held_out,
        "teacher_failures": teacher.failures,
        "collect_s": round(time.perf_counter() - start, 1),
    }
    write_stats(directory, stats)
    return stats


# ------------------------------------------------------------------------------------------------------- train


def train(config: ColdStartConfig, dataset: Path, model_dir: str, out: Path) -> str:
    """Fine-tunes on the dataset's train split with the learner group; returns the checkpoint directory."""
    run = config.run
    train_set, validation = read_split(dataset, "train"), read_split(dataset, "validation")
    world, size = run.learner.num, config.sft.batch_size
    validation = validation[: len(validation) // world * world] or validation * world  # every rank gets as many
    steps_per_epoch = len(train_set) // size
    if steps_per_epoch == 0:
        raise ValueError(f"sft.batch_size={size} is larger than the {len(train_set)} training examples")
    total_steps = steps_per_epoch * config.sft.epochs

    cluster.connect(num_cpus=int(run.learner.num * run.resources.learner_cpus + 0.999))
    gpu = cluster.use_gpu(run)
    placement = cluster.learner_placement(run, gpu)
    learners = LearnerGroup(
        dataclasses.replace(run.learner, model_dir=model_dir),
        dataclasses.replace(run.grpo, kl_coef=0.0),  # no reference model: SFT has no KL term
        run.weight_sync,
        placement_group=placement,
        num_cpus=run.resources.learner_cpus,
        use_gpu=gpu,
    )
    monitor = Monitor(out, config.to_dict(), total_steps)
    rng = np.random.default_rng(run.seed)
    try:
        monitor.writer.add_scalar("loss/sft_eval", learners.sft_eval(validation)["loss/sft_eval"], 0)
        step = 0
        for epoch in range(config.sft.epochs):
            order = rng.permutation(len(train_set))
            for b in range(steps_per_epoch):
                t0 = time.perf_counter()
                lr = cosine_lr(step, total_steps, config.sft.lr, config.sft.warmup_steps, config.sft.min_lr_ratio)
                metrics = learners.sft_update([train_set[i] for i in order[b * size : (b + 1) * size]], lr)
                step += 1
                if step % config.sft.eval_every == 0 or step == total_steps:
                    metrics.update(learners.sft_eval(validation))
                metrics["sft/epoch"] = epoch + (b + 1) / steps_per_epoch
                metrics["perf/step_s"] = time.perf_counter() - t0
                for key, value in sorted(metrics.items()):
                    monitor.writer.add_scalar(key, value, step)
                monitor.bar.update(1)
                monitor.bar.write(
                    f"sft step {step}/{total_steps}  loss {metrics['loss/sft']:.4f}"
                    + (f"  eval {metrics['loss/sft_eval']:.4f}" if "loss/sft_eval" in metrics else "")
                    + f"  lr {lr:.2e}"
                )
        return learners.save_checkpoint(str(out / run.checkpoint.dir), config.to_dict(), run.checkpoint.keep_last)
    finally:
        monitor.close()
        learners.shutdown()
        ray.util.remove_placement_group(placement)  # on a shared cluster, the RL run that follows needs the room


def run(config: ColdStartConfig) -> str:
    """Collects (or reads) the dataset and fine-tunes on it; returns the checkpoint directory."""
    out = Path(config.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(config.run.model.name, config.run.model.path)
    print(f"output dir: {out}  (tensorboard --logdir {out / 'tensorboard'})  model: {model.name}")
    dataset = Path(config.collect.dataset).resolve() if config.collect.dataset else out / "dataset"
    if config.collect.dataset is None:
        stats = collect_dataset(config, dataset)
    else:
        stats = read_stats(dataset)
    print(f"dataset {dataset}: {stats}")
    return train(config, dataset, model.path, out)


def main(overrides: list[str]) -> str:
    """Runs the cold start; returns the checkpoint directory (its hf/ is the cold-started model)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(overrides)  # a bad key stops here, before anything runs
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    ckpt = run(config)
    print(f"cold start done: {ckpt}/hf\n  RL from it: python launch/train.py model.path={ckpt}/hf ...")
    return ckpt


# ----------------------------------------------------------------------------------------- the cached cold start

# The code that made a cached cold start: collection, the games, the learner (cold_start_key).
_COLD_START_SOURCES = ("launch/sft.py", "launch/config.py", "actors/policies.py", "actors/prompts.py")
_COLD_START_TREES = ("envs", "learner")


def cold_start_key(config: ColdStartConfig, base_name: str) -> str:
    """The cache key of a cold start: its composed config (not the overrides, nor configs/ as files: an equal config
    reached another way, or an edited RL preset the SFT does not compose, keeps the entry), the base model's cached
    directory name (itself keyed by its builder), the code that collects and trains, and the library versions."""
    import deepspeed
    import torch
    import transformers

    digest = hashlib.sha256(repr((config, base_name)).encode())
    digest.update(repr((torch.__version__, deepspeed.__version__, transformers.__version__)).encode())
    root = Path(__file__).resolve().parent.parent
    files = [root / f for f in _COLD_START_SOURCES] + sorted(
        f for tree in _COLD_START_TREES for f in (root / tree).rglob("*.py")
    )
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\x00" + file.read_bytes())
    return digest.hexdigest()


def ensure_cold_start(
    name: str, overrides: Sequence[str], cache_dir: str | os.PathLike | None = None, quiet: bool = True
) -> Path:
    """The HF directory of the cold start `launch/sft.py <overrides>`, run on first use and then reused.

    Cached like the tiny model (`actors.tiny_model.cached_build`), keyed by `cold_start_key`; built in a private
    directory and renamed into place. The directory holds the checkpoint's hf/ files, `cold_start.json` (the
    overrides, the dataset's counts, `build_minutes`) and the SFT's tensorboard/.
    Needs Ray (joins the running cluster or starts a local one, as launch/sft.py does).

    Args:
        name: the cache entry's name, e.g. "tiny_g1".
        overrides: launch/sft.py's command line (game, model, collect.*, sft.*, ...); `output_dir` is set here.
        cache_dir: the cache root; default `$VLM_GYM_RL_CACHE` or `~/.cache/vlm_gym_rl`.
        quiet: keep the collection and the SFT steps off the console (one line says what is built).
    """
    config = load_config([*overrides, "output_dir=unused"])
    base = resolve_model(config.run.model.name, config.run.model.path, cache_dir)

    def build(out: Path) -> None:
        start = time.perf_counter()
        print(f"model {name}: building its cold start on first use (launch/sft.py {' '.join(overrides)}) ...")
        run_dir = out / "run"
        model = dataclasses.replace(config.run.model, path=base.path)  # the base the key names
        cold = dataclasses.replace(config, run=dataclasses.replace(config.run, model=model, output_dir=str(run_dir)))
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            ckpt = Path(run(cold))
        for file in (ckpt / checkpoint.HF_DIR).iterdir():
            file.rename(out / file.name)
        (run_dir / "tensorboard").rename(out / "tensorboard")
        minutes = (time.perf_counter() - start) / 60
        stats = {"overrides": list(overrides), "build_minutes": round(minutes, 2), **read_stats(run_dir / "dataset")}
        (out / "cold_start.json").write_text(json.dumps(stats, indent=2))
        shutil.rmtree(run_dir)
        print(f"model {name}: built in {minutes:.1f} min, cached at {out.parent}")

    return cached_build(name, cold_start_key(config, Path(base.path).name), build, cache_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
