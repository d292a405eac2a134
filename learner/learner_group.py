"""The learner group: W `Learner` Ray actors forming one DeepSpeed world, and the driver's handle on them.

Rank layout: learner rank r runs in bundle `bundle_offset + r` of the caller's placement group (one GPU each on GPU
nodes); rank 0's node address and a free port on it are the world's MASTER_ADDR/PORT (NCCL on GPU, gloo on CPU).

Weight sync, seen from the driver (`init_weight_sync` once, `sync_weights` every k updates)::

    driver --serve--> learner 0: old group destroyed, new TCPStore             --> SyncGroupInfo
    driver --join_weight_sync(info, 1 + i*TP)--> engine i (all its TP workers)   } concurrently: each member passes
    driver --join_weight_sync--> learner 0                                       } the gate, then joins the group
    ...
    driver --weight_plan--> learner 0                   --> SyncPlan (names, shapes, buckets)
    driver --receive_weights(plan)--> engine i          ONE remote call per engine per sync
    driver --broadcast_weights(plan)--> every learner   ZeRO-3 gather per bucket; rank 0 broadcasts

An engine is any Ray actor handle (a rollout actor, or a vLLM engine actor) with two remote methods, those of
`actors.vllm_engine.VLLMEngine`: `join_weight_sync(info, rank_offset)` and `receive_weights(plan) -> load seconds`.
They drive vLLM's weight-transfer lifecycle on all the engine's workers (see learner/weight_sync.py); `receive_weights`
then resets the engine's prefix and encoder caches and takes `plan.version` as its policy version.

Late join (an engine restarted): the old group has a dead member and cannot be reused, so the driver calls
`init_weight_sync` again with the full list of engines; the first sync of a new group sends every parameter, frozen
ones included, so the new engine holds the current weights before it generates.

Failures: the ranks run collectives together, so one rank that fails (an exception, or its process died) leaves the
others waiting in a collective for a peer that never comes, until gloo's or NCCL's timeout (minutes to hours). The
driver therefore waits on all ranks at once and the first failure breaks the whole group: every rank is killed at
once and that error is raised, the rank's own exception or `LearnerDiedError`. Agreeing on errors inside the learner
(an all-reduce of an error flag) could not cover a rank that dies, nor one that fails inside ZeRO-3's gathers; a
group that is killed and rebuilt from a checkpoint (launch/train.py) has no half-done state to reason about.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.config import GRPOConfig, LearnerConfig, WeightSyncConfig
from learner.grpo_learner import Learner

logger = logging.getLogger(__name__)

# After a rank's first failure, how long to wait for the others to report theirs: a rank dying makes its peers' gloo
# collectives fail too, and the death (not their "connection closed") is the error that tells the caller what to do.
_FAILURE_GRACE_S = 5.0


@dataclass(frozen=True)
class SyncStats:
    """Timings of one weight sync (seconds) and its size."""

    version: int
    nbytes: int
    full: bool  # frozen parameters included
    gather_s: float  # ZeRO-3 gathers on learner rank 0
    pack_s: float  # copying gathered tensors into the send buffers (shared memory) on learner rank 0
    broadcast_s: float  # packing and sending on learner rank 0 (overlaps the engines' loading)
    load_s: float  # slowest engine's receive + load
    total_s: float  # wall time of the whole sync, as the driver sees it

    @property
    def gbps(self) -> float:
        return self.nbytes / self.total_s / 1e9 if self.total_s > 0 else 0.0


class WeightSyncError(RuntimeError):
    """A sync group that did not form (`version` None) or a weight sync that did not reach every engine: which
    engines failed (index in the sync group's engine list) and why, and learner rank 0's error. Nothing is half-done
    on the learner side; the group is unusable and `init_weight_sync` must run again."""

    def __init__(self, version: int | None, engine_errors: dict[int, str], sender_error: str | None):
        self.version, self.engine_errors, self.sender_error = version, engine_errors, sender_error
        details = [f"engine {i}: {why}" for i, why in sorted(engine_errors.items())]
        details += [f"learner rank 0: {sender_error}"] if sender_error else []
        what = "the weight-sync group did not form" if version is None else f"weight sync to version {version} failed"
        super().__init__(f"{what}: " + "; ".join(details))


class LearnerDiedError(RuntimeError):
    """A learner rank's process died (killed, out of memory, its node lost). The group has been shut down; the caller
    may build a new one and restore it from a checkpoint."""


def _settle(refs: list[ray.ObjectRef]) -> tuple[list[Any], dict[int, str]]:
    """Waits for every ref; returns the values of those that succeeded and, by index, why the others failed (an actor
    that died, or the exception its task raised)."""
    values, failures = [], {}
    for index, ref in enumerate(refs):
        try:
            values.append(ray.get(ref))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            cause = getattr(e, "cause", None) or e  # a task error carries the actor's own exception
            failures[index] = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
    return values, failures


def _death(ref: ray.ObjectRef) -> ray.exceptions.RayActorError | None:
    """The error of a finished call whose actor died; None while it runs, or when it returned or raised its own."""
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as e:
        return e
    except Exception:  # GetTimeoutError (still running) or the task's own exception
        return None
    return None


class LearnerGroup:
    """W learner actors in one DeepSpeed world.

    Args:
        config: learner settings (`num` ranks).
        grpo: loss settings.
        sync: weight-sync settings.
        placement_group: the caller's placement group; None schedules the actors freely.
        bundle_offset: first bundle of `placement_group` used by rank 0 (rank r uses offset + r).
        num_cpus: CPUs reserved by each learner actor.
        use_gpu: one GPU per learner actor.
    """

    def __init__(
        self,
        config: LearnerConfig,
        grpo: GRPOConfig,
        sync: WeightSyncConfig,
        placement_group: PlacementGroup | None = None,
        bundle_offset: int = 0,
        num_cpus: float = 1,
        use_gpu: bool = False,
    ):
        self.config, self.sync = config.validate(), sync.validate()
        sync.resolved_backend(use_gpu)  # a backend that cannot work fails here, not at the first engine's init
        actor_cls = ray.remote(Learner)
        self.learners = []
        for rank in range(config.num):
            options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0}
            if not use_gpu:  # said, not detected: DeepSpeed warns on every rank when it falls back to its CPU one
                options["runtime_env"] = {"env_vars": {"DS_ACCELERATOR": "cpu"}}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=bundle_offset + rank
                )
            self.learners.append(actor_cls.options(**options).remote(config, grpo, rank, config.num))
        addr, port = self._gather([self.learners[0].node_address.remote()])[0]
        self._gather([learner.setup.remote(addr, port) for learner in self.learners])
        self.engines: list[Any] = []

    def _gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """The results of one call per rank (`refs[r]` on rank r); the first failure shuts the group down at once.

        Raises:
            LearnerDiedError: a rank's process died (also when the others failed because it did).
            Exception: the failed rank's own exception (Ray's task error, also an instance of the original type).
        """
        self._check_open()
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as error:
                if pending:
                    ray.wait(pending, num_returns=len(pending), timeout=_FAILURE_GRACE_S)
                self._fail(refs, error)
        return ray.get(list(refs))

    def _fail(self, refs: list[ray.ObjectRef], first: Exception) -> None:
        """Shuts the group down and raises the failure: a death if any rank died, else `first`."""
        dead = [(rank, death) for rank, ref in enumerate(refs) if (death := _death(ref)) is not None]
        logger.error("a learner rank failed (%s); killing every rank of the group", type(first).__name__)
        self.shutdown()
        if dead:
            rank, cause = dead[0]
            raise LearnerDiedError(f"learner rank {rank} died ({type(cause).__name__})") from cause
        raise first

    def _check_open(self) -> None:
        if not self.learners:
            raise RuntimeError("the learner group was shut down (a rank failed); build a new one")

    def update(self, groups: list[Any]) -> dict[str, float]:
        """One GRPO update over the batch, `grpo.num_minibatches` optimizer steps per pass, on all ranks.

        Args:
            groups: TrajectoryGroups, or BufferItems / ObjectRefs of them: each rank pulls its own slice's objects
                from Ray's object store (the driver never touches the images).

        Returns:
            Metrics reduced over all ranks (see `Learner.update`).
        """
        self._check_open()
        world = len(self.learners)
        if not groups or len(groups) % world:
            raise ValueError(f"{len(groups)} groups cannot be split evenly (and non-empty) over learner.num={world}")
        # Strided shards: rank r gets groups r, r + W, ... Each rank cuts its share into the same number of
        # minibatches, so optimizer step k trains on the k-th contiguous slice of the batch, whatever W is.
        refs = [learner.update.remote(groups[r::world]) for r, learner in enumerate(self.learners)]
        return self._gather(refs)[0]

    def init_weight_sync(self, engines: list[Any], workers_per_engine: int = 1) -> None:
        """(Re-)creates the sync group of learner rank 0 and every worker of `engines` (TP = workers_per_engine).

        Raises:
            WeightSyncError: the group did not form, e.g. an engine died before joining: the others then wait for it
                at the gate until weight_sync.timeout_s, so the error comes after that timeout.
        """
        self._check_open()
        world_size = len(engines) * workers_per_engine + 1
        leader = self.learners[0]
        self.engines = []
        serve = leader.serve_weight_sync.remote(world_size, self.sync)
        info = self._gather([serve])[0]
        joins = [engine.join_weight_sync.remote(info, 1 + i * workers_per_engine) for i, engine in enumerate(engines)]
        _, leader_failed = _settle([leader.join_weight_sync.remote()])
        _, failures = _settle(joins)
        if leader_failed:  # a join that timed out is a fault of the sync group; a dead rank 0 is the learner's
            self._gather([learner.__ray_ready__.remote() for learner in self.learners])
        if failures or leader_failed:
            raise WeightSyncError(None, failures, leader_failed.get(0))
        self.engines = list(engines)

    def sync_weights(self, version: int) -> SyncStats:
        """Broadcasts the current weights to every engine of the sync group; they then serve `version`.

        Raises:
            WeightSyncError: an engine died or a side of the broadcast failed. Raised once every side has settled
                (gloo: at once, since every member that fails tears its end of the group down; NCCL: within
                weight_sync.timeout_s), with the learner world still in step; the group is then unusable, so the
                caller calls `init_weight_sync` again (with the restarted engines) before the next sync.
        """
        self._check_open()
        if not self.engines:
            raise RuntimeError("init_weight_sync(engines) must be called before sync_weights")
        start = time.perf_counter()
        plan = self._gather([self.learners[0].weight_plan.remote(version, self.sync.bucket_mb)])[0]
        loads = [engine.receive_weights.remote(plan) for engine in self.engines]
        sends = [learner.broadcast_weights.remote(plan) for learner in self.learners]
        # The learners first: a dead rank shuts the group down, whose sockets closing fails the engines' receives.
        timings = self._gather(sends)[0]  # a broadcast failure comes back as timings["error"]
        load_times, failures = _settle(loads)
        if failures or timings["error"]:
            raise WeightSyncError(version, failures, timings["error"])
        return SyncStats(
            version=version,
            nbytes=plan.nbytes,
            full=plan.full,
            gather_s=timings["gather_s"],
            pack_s=timings["pack_s"],
            broadcast_s=timings["broadcast_s"],
            load_s=max(load_times),
            total_s=time.perf_counter() - start,
        )

    def consolidated_state_dict(self) -> dict:
        """The full weights (Hugging Face names) from rank 0, e.g. for `engine.load_weights` or inspection."""
        return self._gather([learner.consolidated_state_dict.remote() for learner in self.learners])[0]

    def save_checkpoint(self, root: str, run_config: dict[str, Any], keep_last: int) -> str:
        """Writes a checkpoint under `root` (see learner.checkpoint); returns its directory."""
        refs = [learner.save_checkpoint.remote(root, run_config, keep_last) for learner in self.learners]
        return self._gather(refs)[0]

    def load_checkpoint(self, path: str) -> dict[str, int]:
        """Restores every rank from a checkpoint directory; returns its step and version."""
        return self._gather([learner.load_checkpoint.remote(path) for learner in self.learners])[0]

    def sft_update(self, examples: list[Any], lr: float) -> dict[str, float]:
        """One supervised step (G1's cold start) on a batch of `learner.sft.SFTExample`s, sharded over the ranks.

        Raises:
            ValueError: a batch that does not split evenly over the ranks (ZeRO-3 needs equal micro-batch counts).
        """
        return self._gather([learner.sft_update.remote(shard, lr) for learner, shard in self._sft_shards(examples)])[0]

    def sft_eval(self, examples: list[Any]) -> dict[str, float]:
        """Token-mean NLL of held-out examples (see `sft_update` for the sharding)."""
        return self._gather([learner.sft_eval.remote(shard) for learner, shard in self._sft_shards(examples)])[0]

    def _sft_shards(self, examples: list[Any]) -> list[tuple[Any, list[Any]]]:
        world = len(self.learners)
        if not examples or len(examples) % world:
            raise ValueError(f"{len(examples)} examples do not split evenly (and non-empty) over learner.num={world}")
        return [(learner, examples[r::world]) for r, learner in enumerate(self.learners)]

    def shutdown(self) -> None:
        """Ends the learner actors."""
        for learner in self.learners:
            ray.kill(learner)
        self.learners = []
