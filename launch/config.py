"""The training run's configuration: Hydra composes YAML, `resolve` turns it into frozen, checked dataclasses.

Each package owns the schema of its part (envs.config, actors.config, learner.config, replay.config); this module only
composes them, adds the trainer's own settings and the checks that span parts (batch split over learners, buffer
room for the rounds in flight). Every error names the key and what is allowed, and happens before any actor starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import envs
from actors.config import RolloutConfig
from actors.models import MODEL_NAMES
from envs.config import GameSpec, PoolConfig
from launch.overrides import quote_numeric_choices
from learner.config import CheckpointConfig, GRPOConfig, LearnerConfig, WeightSyncConfig
from replay.config import BufferConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TRAINER_MODES = ("sync", "async")
GPU_ACTOR_CPUS = 4.0  # CPUs of a rollout actor with a GPU engine, unless resources.actor_cpus says otherwise


@dataclass(frozen=True)
class TrainerConfig:
    """The driver's loop.

    Attributes:
        mode: "sync" (generate, train, sync weights: the paper's on-policy loop) or "async" (actors keep generating
            with weights at most `buffer.max_staleness` versions old; the learner trains as soon as a batch is ready).
        total_steps: learner updates in the run.
        groups_per_step: B, trajectory groups (states) per learner update (the paper: 128).
        resume: restart from the latest checkpoint under `output_dir` (same step, version and weights).
        image_every: log a sample board with the model's response to TensorBoard every this many steps (0: never).
        round_timeout_s: how long the driver waits for a batch before it reports the actors as stuck.
        max_minutes: wall-clock budget of the run (null: none); the run ends after the step that passes it, with a
            checkpoint, as if total_steps were reached.
        verbose: show the components' own logs (vLLM, DeepSpeed, Ray, transformers' progress bars, deprecation
            warnings) on the console; off, the run prints its progress bar, one line per step and errors.
    """

    mode: str = "sync"
    total_steps: int = 200
    groups_per_step: int = 128
    resume: bool = False
    image_every: int = 10
    round_timeout_s: float = 900.0
    max_minutes: float | None = None
    verbose: bool = False

    def validate(self) -> TrainerConfig:
        _require(self.mode in TRAINER_MODES, "trainer.mode", f"one of {', '.join(TRAINER_MODES)}", self.mode)
        _require(
            _is_int(self.total_steps) and self.total_steps >= 1,
            "trainer.total_steps",
            "an integer >= 1",
            self.total_steps,
        )
        _require(
            _is_int(self.groups_per_step) and self.groups_per_step >= 1,
            "trainer.groups_per_step",
            "an integer >= 1",
            self.groups_per_step,
        )
        _require(isinstance(self.resume, bool), "trainer.resume", "true or false", self.resume)
        _require(
            _is_int(self.image_every) and self.image_every >= 0,
            "trainer.image_every",
            "an integer >= 0",
            self.image_every,
        )
        _require(self.round_timeout_s > 0, "trainer.round_timeout_s", "a number > 0", self.round_timeout_s)
        _require(
            self.max_minutes is None or self.max_minutes > 0,
            "trainer.max_minutes",
            "null or a number > 0",
            self.max_minutes,
        )
        _require(isinstance(self.verbose, bool), "trainer.verbose", "true or false", self.verbose)
        return self


@dataclass(frozen=True)
class ResourcesConfig:
    """What each Ray actor reserves; GPUs follow the model (`use_gpu`), one per learner and `actors.tp` per actor.

    Attributes:
        use_gpu: "auto" (GPUs when the cluster has them), true or false.
        actor_cpus: CPUs reserved by each rollout actor; null: 1 without GPUs (the engine is the actor's one busy
            thread), GPU_ACTOR_CPUS with them, where the engine loop, image preprocessing, the games and scoring each
            need a core to keep a GPU fed.
        learner_cpus: CPUs reserved by each learner rank.
    """

    use_gpu: Any = "auto"
    actor_cpus: float | None = None
    learner_cpus: float = 1.0

    def validate(self) -> ResourcesConfig:
        _require(self.use_gpu in ("auto", True, False), "resources.use_gpu", "auto, true or false", self.use_gpu)
        cpus = self.actor_cpus
        _require(cpus is None or cpus > 0, "resources.actor_cpus", "null (auto) or a number > 0", cpus)
        _require(self.learner_cpus > 0, "resources.learner_cpus", "a number > 0", self.learner_cpus)
        return self

    def cpus_per_actor(self, gpu: bool) -> float:
        """What a rollout actor reserves, `actor_cpus` or its default for a fleet with or without GPUs."""
        if self.actor_cpus is not None:
            return self.actor_cpus
        return GPU_ACTOR_CPUS if gpu else 1.0


@dataclass(frozen=True)
class ClusterConfig:
    """How the run's processes reach each other.

    Attributes:
        socket_ifname: the network interface of the collectives (weight broadcast, DeepSpeed), set as
            GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME in every actor's environment; for nodes with several networks,
            where gloo and NCCL may otherwise pick one the other nodes can't reach. Empty: unset (their own choice).
    """

    socket_ifname: str = ""

    def validate(self) -> ClusterConfig:
        name = self.socket_ifname
        ok = isinstance(name, str) and not any(c.isspace() for c in name)
        _require(ok, "cluster.socket_ifname", "an interface name such as eth0 (no spaces), or empty", name)
        return self


@dataclass(frozen=True)
class ModelConfig:
    """Which policy to train: a name of actors.models.MODEL_NAMES, and optionally a local directory for it."""

    name: str = "auto"
    path: str | None = None

    def validate(self) -> ModelConfig:
        _require(self.name in MODEL_NAMES, "model.name", f"one of {', '.join(MODEL_NAMES)}", self.name)
        return self


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, resolved and checked."""

    output_dir: str
    seed: int
    model: ModelConfig
    pool: PoolConfig
    actors: RolloutConfig
    learner: LearnerConfig
    grpo: GRPOConfig
    weight_sync: WeightSyncConfig
    checkpoint: CheckpointConfig
    buffer: BufferConfig
    trainer: TrainerConfig
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the resolved config (saved with checkpoints and shown in TensorBoard)."""
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config key {key!r} must be {allowed}; got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _build(cls: type, section: Mapping[str, Any] | None, where: str, **runtime: Any) -> Any:
    """`cls(**section)` with unknown keys named, then `validate()` where the class has one."""
    values = dict(section or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config key '{where}.{unknown[0]}'; allowed keys of '{where}': {', '.join(allowed)}")
    for key, value in values.items():
        if isinstance(value, list):  # YAML has no tuples; the dataclasses use them for fixed-size values
            values[key] = tuple(value)
    try:
        built = cls(**values, **runtime)
        if hasattr(built, "validate"):
            built.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"config section '{where}': {e}") from None
    return built


def _games(game: Mapping[str, Any], reward: Mapping[str, Any]) -> tuple[GameSpec, ...]:
    """The `game` section, {name: {weight, difficulty, random_steps, reward}}, as GameSpecs.

    The top-level `reward` section is every game's default; a game's own `reward` entries override it (Shisen-Sho's
    perception reward is off, as in the paper).
    """
    if not game:
        raise ValueError("config key 'game' must name at least one game, e.g. game=tetris")
    specs = []
    for name, entry in game.items():
        name = str(name)
        if name not in envs.GAMES:
            raise ValueError(f"unknown game 'game.{name}'; allowed games: {', '.join(envs.GAMES)}")
        entry = dict(entry or {})
        entry["reward"] = {**reward, **(entry.get("reward") or {})}
        spec = GameSpec.from_dict({"name": name, **entry})
        envs.GAMES[name].check_difficulty(spec.difficulty)  # knob errors now, not in an actor later
        specs.append(spec)
    return tuple(specs)


def resolve(cfg: DictConfig | Mapping[str, Any]) -> TrainConfig:
    """The composed Hydra config as a checked TrainConfig; raises ValueError naming the first bad key.

    Args:
        cfg: the composed config (configs/train.yaml plus the chosen groups and command-line overrides).
    """
    raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    sections = (
        "output_dir",
        "seed",
        "model",
        "game",
        "reward",
        "pool",
        "actors",
        "learner",
        "grpo",
        "weight_sync",
        "checkpoint",
        "buffer",
        "trainer",
        "resources",
        "cluster",
    )
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; allowed top-level keys: {', '.join(sections)}")
    seed = raw.get("seed", 0)
    _require(_is_int(seed) and seed >= 0, "seed", "an integer >= 0", seed)
    games = _games(raw.get("game") or {}, raw.get("reward") or {})
    pool = _build(PoolConfig, {"seed": seed, **(raw.get("pool") or {})}, "pool", games=games)
    trainer = _build(TrainerConfig, raw.get("trainer"), "trainer")
    weight_sync = _build(WeightSyncConfig, raw.get("weight_sync"), "weight_sync")
    # The engines load weights with the learner's transport (weight_sync.backend: gloo also beside a GPU learner).
    actors_raw = {"seed": seed, **(raw.get("actors") or {}), "weight_transfer": weight_sync.backend}
    actors = _build(RolloutConfig, actors_raw, "actors")
    learner = _build(
        LearnerConfig,
        {
            "seed": seed,
            "max_response_len": actors.max_new_tokens,
            **(raw.get("learner") or {}),
            "temperature": actors.temperature,  # the learner scores the distribution the actors sample from
            "model_dir": "<resolved at start>",
        },
        "learner",
    )
    default_dir = f"runs/{'-'.join(spec.name for spec in games)}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = TrainConfig(
        output_dir=str(raw.get("output_dir") or default_dir),
        seed=seed,
        model=_build(ModelConfig, raw.get("model"), "model"),
        pool=pool,
        actors=actors,
        learner=learner,
        grpo=_build(GRPOConfig, raw.get("grpo"), "grpo"),
        weight_sync=weight_sync,
        checkpoint=_build(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
        buffer=_build(BufferConfig, _buffer_section(raw, actors, trainer), "buffer"),
        trainer=trainer,
        resources=_build(ResourcesConfig, raw.get("resources"), "resources"),
        cluster=_build(ClusterConfig, raw.get("cluster"), "cluster"),
    )
    _check_across(config)
    return config


def _buffer_section(raw: dict[str, Any], actors: RolloutConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """The buffer section, with `capacity: null` (the default) sized for the mode: a batch plus one round of every
    actor in sync mode; one batch in async mode, where what the buffer holds waits, growing staler (`stream_slots`)."""
    section = dict(raw.get("buffer") or {})
    if section.get("capacity") is None:
        batch = trainer.groups_per_step
        section["capacity"] = batch + actors.num * actors.states_per_round if trainer.mode == "sync" else batch
    return section


def stream_slots(config: TrainConfig) -> int:
    """Async mode: the states each actor may have in flight (`RolloutActor.stream(max_states_in_flight)`).

    A state submitted under version v waits behind what is ahead of it, at most the buffer's capacity C and the other
    states in flight S, taken B = trainer.groups_per_step per step: with C + S <= m B it is in one of the next m
    batches. Each batch before it, and the one the learner was training on when it was submitted, adds one version at
    most, so it is at most m = buffer.max_staleness versions old when taken. S is what is left of m B, over the actors.
    """
    batch, capacity = config.trainer.groups_per_step, config.buffer.capacity
    return (config.buffer.max_staleness * batch - capacity) // config.actors.num


def _check_across(config: TrainConfig) -> None:
    """Checks that involve several sections."""
    batch, learners = config.trainer.groups_per_step, config.learner.num
    _require(
        batch % learners == 0,
        "trainer.groups_per_step",
        f"a multiple of learner.num ({learners}), so every learner rank trains on as many groups",
        batch,
    )
    samples_per_rank = batch // learners * config.actors.group_size
    _require(
        config.grpo.num_minibatches <= samples_per_rank,
        "grpo.num_minibatches",
        f"at most the responses per learner rank per step ({samples_per_rank})",
        config.grpo.num_minibatches,
    )
    _require(
        config.buffer.capacity >= batch,
        "buffer.capacity",
        f">= {batch} (trainer.groups_per_step), or null to size it",
        config.buffer.capacity,
    )
    # Versions count learner steps; engines take a new one every weight_sync.every_steps = k steps. Async: the round
    # a broadcast waits for was made with the previous broadcast's weights, k versions before the new one. Sync makes
    # only what the batch takes, with the engines' version: nothing waits in the buffer across a broadcast.
    staleness, every = config.buffer.max_staleness, config.weight_sync.every_steps
    _require(
        config.trainer.mode == "sync" or staleness >= every,
        "buffer.max_staleness",
        f">= weight_sync.every_steps = {every} with trainer.mode=async (a group started just before a broadcast is "
        f"{every} version(s) old at the next one; a lower bound drops it)",
        staleness,
    )
    # Async: the buffer and the states in flight must be taken within max_staleness versions (stream_slots).
    most = staleness * batch - config.actors.num
    _require(
        config.trainer.mode == "sync" or config.buffer.capacity <= most,
        "buffer.capacity",
        f"<= {most} with trainer.mode=async, buffer.max_staleness={staleness} and actors.num={config.actors.num} "
        "(what the buffer holds waits; with a state in flight per actor it must be trained within max_staleness "
        "versions), or null (one batch, which needs buffer.max_staleness >= 2)",
        config.buffer.capacity,
    )


def compose(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Composes configs/<config_name>.yaml (train, or sft: the cold start's) with command-line style overrides (e.g.
    ["game=2048", "actors.num=2"])."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=quote_numeric_choices(overrides))
