"""The driver's side of generation: keeps the rollout actors working, collects batches, and heals dead actors.

Two modes (trainer.mode):
- sync: every actor runs a round, the driver waits for all of them, repeats until the buffer holds a batch; the
  learner then trains on groups of the current policy version only (the paper's on-policy loop).
- async: every actor always has a round in flight; the learner takes a batch as soon as the buffer has one, so
  generation overlaps training. Groups may be up to buffer.max_staleness versions old.

Either way a weight broadcast needs every engine between rounds (`wait_idle`), because all engines take part in it.

A rollout actor that dies is restarted by Ray (max_restarts=-1). Its in-flight round is lost and counted, the
groups it had put in the buffer are dropped (their objects died with their owner), and once it is back it gets the
current weights from the learner and the weight-sync group is rebuilt with it, before it generates again. A death
while the actor is idle raises nothing; the restarted actor gives itself away by its weights' version (its engine
starts from the model's initial weights, version 0), checked on every round it returns and before every broadcast.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import RayActorError

from launch.cluster import RolloutFleet
from launch.config import TrainConfig

logger = logging.getLogger(__name__)


class RolloutDriver:
    """Runs the rollout actors of `fleet` for the training loop.

    Args:
        config: the run's config (trainer.mode, trainer.groups_per_step, actors.states_per_round, ...).
        fleet: the rollout actors.
        buffer: the replay buffer actor.
        learners: the learner group (source of the current weights for restarted actors).
    """

    def __init__(self, config: TrainConfig, fleet: RolloutFleet, buffer: Any, learners: Any):
        self.config, self.fleet, self.buffer, self.learners = config, fleet, buffer, learners
        self.in_flight: dict[ray.ObjectRef, int] = {}  # run_round result -> actor index
        self.engine_version = 0  # the version every engine holds since the last broadcast
        self.finished_metrics: list[dict[str, float]] = []  # rounds harvested since the last batch
        self.buffer_lost = 0  # groups dropped from the buffer because their actor died

    # ---- one batch ------------------------------------------------------------------------------------------------
    def sync_weights(self, version: int) -> Any:
        """Broadcasts the learner's weights (as `version`) to every engine; restarted engines are healed first.

        Returns:
            The broadcast's SyncStats.
        """
        self.wait_idle()  # every engine takes part in the broadcast: none may be in a round
        versions = ray.get([actor.get_policy_version.remote() for actor in self.fleet.actors])
        for index, engine_version in enumerate(versions):
            if engine_version != self.engine_version and index not in self.fleet.stale_engines:
                self._restarted(index, groups_lost=0)
        if self.fleet.stale_engines:
            self._heal(version)
        stats = self.learners.sync_weights(version)
        self.engine_version = version
        return stats

    def collect(self, version: int) -> tuple[list[Any], list[dict[str, float]]]:
        """Generates until the buffer holds trainer.groups_per_step groups, and takes them.

        Returns:
            The batch's BufferItems and the metrics of the rounds that finished meanwhile.
        """
        batch = self.config.trainer.groups_per_step
        timeout = self.config.trainer.round_timeout_s
        if self.fleet.stale_engines:
            self._heal(version)
        if self.config.trainer.mode == "sync":
            while ray.get(self.buffer.stats.remote()).size < batch:
                for index in range(len(self.fleet.actors)):
                    self._launch(index)
                self.wait_idle()
                if self.fleet.stale_engines:
                    self._heal(version)
            items = ray.get(self.buffer.get.remote(batch, timeout))
        else:
            self._keep_busy()
            pending = self.buffer.get.remote(batch, timeout)
            while True:
                ready, _ = ray.wait([pending, *self.in_flight], num_returns=1)
                if ready[0] == pending:
                    break
                self._harvest(ready[0])
                if self.fleet.stale_engines:
                    self._heal(version)
                self._keep_busy()
            items = ray.get(pending)
        if len(items) < batch:
            raise RuntimeError(
                f"the rollout actors produced {len(items)} of {batch} groups in trainer.round_timeout_s={timeout}s; "
                "see the actors' logs (ray logs, or the dashboard)"
            )
        metrics, self.finished_metrics = self.finished_metrics, []
        return items, metrics

    def wait_idle(self) -> None:
        """Waits until no round is in flight (harvesting their metrics and any actor deaths)."""
        while self.in_flight:
            self._harvest(next(iter(self.in_flight)))

    def counters(self) -> dict[str, float]:
        """Fault counters for TensorBoard."""
        return {
            "faults/actor_restarts": float(self.fleet.restarts),
            "faults/lost_groups": float(self.fleet.lost_groups + self.buffer_lost),
        }

    def stop(self) -> None:
        """Drops the rounds still in flight (end of run or error)."""
        for ref in list(self.in_flight):
            ray.cancel(ref, force=False)
        self.in_flight.clear()

    # ---- internals ------------------------------------------------------------------------------------------------
    def _keep_busy(self) -> None:
        """Async mode: a round in flight on every actor."""
        for index in sorted(set(range(len(self.fleet.actors))) - set(self.in_flight.values())):
            self._launch(index)

    def _launch(self, index: int) -> None:
        self.in_flight[self.fleet.actors[index].run_round.remote()] = index

    def _harvest(self, ref: ray.ObjectRef) -> None:
        """Takes one finished round: its metrics, or, if its actor died or came back restarted, the loss."""
        index = self.in_flight.pop(ref)
        try:
            stats = ray.get(ref).stats
        except RayActorError as e:
            logger.warning("%s died during a round (%s); Ray restarts it", self.fleet.names[index], type(e).__name__)
            self._restarted(index, groups_lost=self.config.actors.states_per_round)
            return
        if stats.policy_version != self.engine_version:  # restarted while idle: it generated with initial weights
            self._restarted(index, groups_lost=stats.num_groups)
            return
        self.finished_metrics.append(stats.to_metrics())

    def _restarted(self, index: int, groups_lost: int) -> None:
        """Counts a restart; the actor's groups in the buffer are dropped (their owner died) and counted as lost."""
        name = self.fleet.names[index]
        logger.warning("%s was restarted: %d groups of its round lost; it gets the current weights", name, groups_lost)
        self.fleet.mark_dead(index, groups_lost)
        self.buffer_lost += ray.get(self.buffer.drop_actor.remote(name))

    def _heal(self, version: int) -> None:
        """Gives restarted actors the current weights and rebuilds the weight-sync group with every engine."""
        self.wait_idle()
        stale = sorted(self.fleet.stale_engines)
        # A restarted actor answers once its __init__ (engine build) is done; this waits for that.
        ray.get([self.fleet.actors[i].get_policy_version.remote() for i in stale])
        weights = self.learners.consolidated_state_dict()
        ray.get([self.fleet.actors[i].load_weights.remote(weights, version) for i in stale])
        self.learners.init_weight_sync(self.fleet.actors, workers_per_engine=self.config.actors.tp)
        self.fleet.stale_engines.clear()
        logger.info(
            "restarted actors %s got weights v%d; weight-sync group rebuilt",
            [self.fleet.names[i] for i in stale],
            version,
        )
