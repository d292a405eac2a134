"""Ray plumbing of a training run: connecting, placing the actors, and keeping rollout actors alive.

The only module besides launch/train.py that applies `ray.remote`. Layout:

    placement group "learners": learner.num bundles {CPU, GPU: 1}, PACK    (one DeepSpeed world, one node if it fits)
    placement group "rollouts": actors.num bundles {CPU, GPU: actors.tp}, SPREAD (one vLLM engine each, across nodes)
    the buffer: a plain, restartable actor (no GPU, no CPU reserved: it only moves object references)

Adding nodes to the cluster and raising `actors.num` adds actors; no code changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.models import ModelSource
from actors.rollout_actor import RolloutActor
from launch.config import TrainConfig
from replay.buffer import ReplayBuffer

logger = logging.getLogger(__name__)

NAMESPACE = "vlm-gym-rl"  # actors are named (rollout-<i>, replay-buffer) in this namespace: `ray.get_actor(name)`
# Rollout actors get the buffer by this name, not by a handle: Ray keeps a handle given to a restartable actor's
# constructor in its object store (and warns that a restart fails once it is lost); a name is a plain string.
BUFFER_NAME = "replay-buffer"
# Environment of every actor on CPU: vLLM's AsyncLLM always runs its engine core in a process of its own; with
# multiprocessing off, the model worker stays inside that process (two processes per engine, not three).
# OMP_NUM_THREADS is left to Ray, which sets it to each actor's num_cpus.
CPU_ACTOR_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Added to every actor's environment unless trainer.verbose: the components' chatter stays out of the console (vLLM
# warns on every weight reload about modules that hold buffers only, DeepSpeed's calls raise torch FutureWarnings,
# transformers draws a progress bar per model load, vLLM-CPU's worker start-up logs a C++ warning on its NUMA binding).
# Errors still show, and `ray logs` keeps each actor's output.
QUIET_ACTOR_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def connect(num_cpus: int | None = None, verbose: bool = False, env: dict[str, str] | None = None) -> str:
    """Joins the cluster named by RAY_ADDRESS (set by `ray job submit`; `RAY_ADDRESS=auto` for one started with
    `ray start` on this machine), else starts a local one for this run only. Quiet unless `verbose` (QUIET_ACTOR_ENV).

    Args:
        num_cpus: logical CPUs of a local cluster (at least this machine's).
        verbose: keep the components' own logs.
        env: more environment variables of every actor (`socket_env`).

    Returns:
        "cluster" or "local", for the start-up line.
    """
    if ray.is_initialized():
        return "cluster"
    defaults = CPU_ACTOR_ENV if verbose else {**CPU_ACTOR_ENV, **QUIET_ACTOR_ENV}
    env_vars = {k: os.environ.get(k, v) for k, v in defaults.items()} | (env or {})
    if "HF_HUB_OFFLINE" in os.environ:  # the actors load models as the driver does
        env_vars["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    runtime_env = {"env_vars": env_vars}
    logging_level = logging.INFO if verbose else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=NAMESPACE, runtime_env=runtime_env, logging_level=logging_level)
        return "cluster"
    cpus = max(num_cpus or 0, os.cpu_count() or 1)
    ray.init(
        num_cpus=cpus,
        namespace=NAMESPACE,
        include_dashboard=False,
        runtime_env=runtime_env,
        logging_level=logging_level,
    )
    return "local"


def quiet_driver() -> None:
    """The driver's share of a quiet run (QUIET_ACTOR_ENV): its own warnings, logs and progress bars."""
    import warnings

    from transformers.utils import logging as hf_logging

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.simplefilter("ignore", category)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.update({k: v for k, v in QUIET_ACTOR_ENV.items() if k not in os.environ})


def socket_env(config: TrainConfig) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME from cluster.socket_ifname (none when it is empty)."""
    name = config.cluster.socket_ifname
    return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name} if name else {}


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def use_gpu(config: TrainConfig) -> bool:
    choice = config.resources.use_gpu
    return cluster_gpus() > 0 if choice == "auto" else bool(choice)


def cpus_needed(config: TrainConfig) -> int:
    """Logical CPUs a local cluster must advertise for every actor to be placed (rollout actors counted as without
    GPUs: a local cluster has at least the machine's cores, and machines with GPUs have many)."""
    res = config.resources
    return int(config.actors.num * res.cpus_per_actor(gpu=False) + config.learner.num * res.learner_cpus + 0.999)


def learner_placement(config: TrainConfig, gpu: bool) -> PlacementGroup:
    bundle = {"CPU": config.resources.learner_cpus, **({"GPU": 1} if gpu else {})}
    pg = placement_group([bundle] * config.learner.num, strategy="PACK", name="learners")
    ray.get(pg.ready())
    return pg


@dataclass(frozen=True)
class RolloutFleet:
    """The rollout actors and their names (`rollout-<i>`, also their Ray actor names in NAMESPACE).

    Each is created with max_restarts=-1: Ray restarts a dead one in the same bundle, and launch/rollouts.py heals it.
    """

    actors: list[Any]
    names: list[str]


def start_rollouts(config: TrainConfig, model: ModelSource, gpu: bool) -> RolloutFleet:
    """Places actors.num rollout actors, each with its own game pool and vLLM engine (actors.tp GPUs), pushing into
    the buffer that `start_buffer` started.

    An engine runs its core in a process of its own (AsyncLLM), beside the actor's threads that prepare states and
    score responses; on GPU its workers are processes of their own too (vLLM's multiprocessing), on CPU the worker
    stays in the engine-core process (CPU_ACTOR_ENV).
    """
    n, tp = config.actors.num, config.actors.tp
    cpus = config.resources.cpus_per_actor(gpu)
    bundle = {"CPU": cpus, **({"GPU": tp} if gpu else {})}
    pg = placement_group([bundle] * n, strategy="SPREAD", name="rollouts")
    ray.get(pg.ready())
    remote_cls = ray.remote(RolloutActor)
    actors = []
    for i in range(n):
        actors.append(
            remote_cls.options(
                name=f"rollout-{i}",
                num_cpus=cpus,
                # The actor holds all of its engine's GPUs; with TP > 1 the engine uses vLLM's multiprocessing
                # executor, one worker per GPU inside this reservation (CUDA_VISIBLE_DEVICES is set by Ray).
                num_gpus=tp if gpu else 0,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=4,  # threaded: stop_stream, drain_stats and weight updates run while `stream` does
                # Merged into the job's env_vars (connect), overriding its CPU default.
                runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}} if gpu else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(config.actors, config.pool, model, actor_id=i, buffer=BUFFER_NAME)
        )
    return RolloutFleet(actors=actors, names=[f"rollout-{i}" for i in range(n)])


def start_buffer(config: TrainConfig) -> Any:
    """The replay buffer as an async Ray actor (its blocked puts wait without blocking gets).

    Restartable: Ray restarts a dead one (empty) and sends the calls in flight (puts, the learner's get) to it again,
    so producers and the driver carry on; the driver counts what the old one held (launch/rollouts.py).
    """
    options = dict(name=BUFFER_NAME, num_cpus=0, max_restarts=-1, max_task_retries=-1)
    return ray.remote(ReplayBuffer).options(**options).remote(config.buffer)
