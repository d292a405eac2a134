"""The driver's side of generation: keeps the rollout actors working, collects batches, and heals restarted actors.

Two modes (trainer.mode):
- sync: every actor runs a round, the driver waits for all of them, repeats until the buffer holds a batch; the
  learner then trains on groups of the current policy version (the paper's on-policy loop).
- async: actors keep generating while the learner trains; the learner takes a batch as soon as the buffer has one,
  so generation overlaps training. Groups may be up to buffer.max_staleness versions old. A round is started only
  when the buffer has room for all of its groups, so a producer never blocks on a full buffer while the learner
  waits for it at a broadcast.

Either way a weight broadcast needs every engine between rounds (`wait_idle`): all engines take part in it.

A rollout actor that dies is restarted by Ray (max_restarts=-1). Its in-flight round is lost and counted, the groups
it had put in the buffer are dropped (their objects died with their owner) and counted, and before it generates
again the weight-sync group is rebuilt with it, whose first broadcast sends every weight. A restarted actor gives
itself away by its incarnation (a new id per process), checked on every round it returns and before every
broadcast, so a death while the actor was idle, which raises nothing, is found too. A death during a broadcast fails
the broadcast (learner.WeightSyncError); the group is rebuilt with the restarted actor and the broadcast repeated.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError

from launch.cluster import RolloutFleet
from launch.config import TrainConfig
from learner import WeightSyncError

logger = logging.getLogger(__name__)

SYNC_ATTEMPTS = 3  # a broadcast that fails this many times in a row (new group each time) is not a lost actor: raise


class RolloutDriver:
    """Runs the rollout actors of `fleet` for the training loop.

    Args:
        config: the run's config (trainer.mode, trainer.groups_per_step, actors.states_per_round, ...).
        fleet: the rollout actors, already in the learner group's weight-sync group.
        buffer: the replay buffer actor.
        learners: the learner group (it broadcasts the weights).
    """

    def __init__(self, config: TrainConfig, fleet: RolloutFleet, buffer: Any, learners: Any):
        self.config, self.fleet, self.buffer, self.learners = config, fleet, buffer, learners
        self.in_flight: dict[ray.ObjectRef, int] = {}  # run_round result -> actor index
        self.finished_metrics: list[dict[str, float]] = []  # rounds harvested since the last batch
        self.engine_version = 0  # the version every engine holds since the last broadcast
        self.incarnations = ray.get([actor.get_incarnation.remote() for actor in fleet.actors])
        self.restarted: set[int] = set()  # actors restarted since the weight-sync group was built
        self.restarts = 0
        self.lost_groups = 0  # groups of interrupted rounds, of dead actors in the buffer, of skipped updates
        self.sync_group_broken = False  # a broadcast failed: the group must be rebuilt before the next one

    # ---- weights --------------------------------------------------------------------------------------------------
    def sync_weights(self, version: int) -> Any:
        """Broadcasts the learner's weights (as `version`) to every engine, restarted ones included.

        An actor that dies during the broadcast, or while a new group forms, fails it (learner.WeightSyncError) and
        leaves the sync group unusable: the group is rebuilt with the restarted actor and the broadcast, now a full
        one, tried again.

        Returns:
            The broadcast's SyncStats.
        """
        self.wait_idle()  # every engine takes part in the broadcast: none may be in a round
        attempt = 1
        while True:
            self._find_idle_restarts()
            try:
                if self.restarted or self.sync_group_broken:
                    # A group with a dead member can't be reused; a new group's first broadcast sends every weight.
                    self.learners.init_weight_sync(self.fleet.actors, workers_per_engine=self.config.actors.tp)
                    restarted = [self.fleet.names[i] for i in sorted(self.restarted)]
                    logger.info("weight-sync group rebuilt (restarted: %s)", restarted)
                    self.restarted.clear()
                    self.sync_group_broken = False
                stats = self.learners.sync_weights(version)
                break
            except WeightSyncError as e:
                if attempt == SYNC_ATTEMPTS:
                    raise
                logger.warning("%s; rebuilding the group and trying again (%d/%d)", e, attempt, SYNC_ATTEMPTS)
                self.sync_group_broken = True
                attempt += 1
        self.engine_version = version
        return stats

    # ---- one batch ------------------------------------------------------------------------------------------------
    def collect(self) -> tuple[list[Any], list[dict[str, float]]]:
        """Generates until the buffer holds trainer.groups_per_step groups, and takes them.

        Returns:
            The batch's BufferItems and the metrics of the rounds that finished meanwhile.
        """
        batch = self.config.trainer.groups_per_step
        timeout = self.config.trainer.round_timeout_s
        deadline = time.monotonic() + timeout
        if self.config.trainer.mode == "sync":
            while self._buffered() < batch:
                if self.restarted:
                    self.sync_weights(self.engine_version)
                for index in range(len(self.fleet.actors)):
                    self._launch(index)
                self.wait_idle()
                if time.monotonic() > deadline:
                    break
            items = ray.get(self.buffer.get.remote(batch, 0))
        else:
            if self.restarted:
                self.sync_weights(self.engine_version)
            self._keep_busy()
            pending = self.buffer.get.remote(batch, timeout)
            while True:
                ready, _ = ray.wait([pending, *self.in_flight], num_returns=1)
                if ready[0] == pending:
                    break
                self._harvest(ready[0])
                if self.restarted:
                    self.sync_weights(self.engine_version)
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
        return {"faults/actor_restarts": float(self.restarts), "faults/lost_groups": float(self.lost_groups)}

    def stop(self) -> None:
        """Drops the rounds still in flight (end of run or error)."""
        for ref in list(self.in_flight):
            ray.cancel(ref, force=False)
        self.in_flight.clear()

    # ---- internals ------------------------------------------------------------------------------------------------
    def _buffered(self) -> int:
        return ray.get(self.buffer.stats.remote()).size

    def _keep_busy(self) -> None:
        """Async mode: a round on every idle actor, as long as the buffer has room for all the rounds in flight."""
        per_round = self.config.actors.states_per_round
        room = self.config.buffer.capacity - self._buffered() - per_round * len(self.in_flight)
        for index in sorted(set(range(len(self.fleet.actors))) - set(self.in_flight.values())):
            if room < per_round:
                break
            self._launch(index)
            room -= per_round

    def _launch(self, index: int) -> None:
        self.in_flight[self.fleet.actors[index].run_round.remote()] = index

    def _harvest(self, ref: ray.ObjectRef) -> None:
        """Takes one finished round: its metrics, or, if its actor died or came back restarted, the loss."""
        index = self.in_flight.pop(ref)
        try:
            stats = ray.get(ref).stats
        except RayActorError as e:
            logger.warning("%s died during a round (%s); Ray restarts it", self.fleet.names[index], type(e).__name__)
            self._restart_found(index, groups_lost=self.config.actors.states_per_round)
            return
        if stats.incarnation != self.incarnations[index]:  # restarted while idle: it generated with initial weights
            self._restart_found(index, groups_lost=0)  # its groups are in the buffer: dropped and counted there
            return
        self.finished_metrics.append(stats.to_metrics())

    def _find_idle_restarts(self) -> None:
        """Asks every actor for its incarnation: a new one is a restart that raised nothing (it died between rounds
        or during a broadcast)."""
        for index in range(len(self.fleet.actors)):
            if self._incarnation(index) != self.incarnations[index]:
                self._restart_found(index, groups_lost=0)

    def _incarnation(self, index: int) -> str:
        """The actor's incarnation id, once it answers: calls fail (ActorUnavailableError) while Ray restarts it."""
        deadline = time.monotonic() + self.config.trainer.round_timeout_s
        while True:
            try:
                return ray.get(self.fleet.actors[index].get_incarnation.remote())
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _restart_found(self, index: int, groups_lost: int) -> None:
        """Counts a restart and its losses; the actor's groups in the buffer are dropped (their owner died)."""
        name = self.fleet.names[index]
        dropped = ray.get(self.buffer.drop_actor.remote(name))
        logger.warning("%s was restarted: %d groups lost; it rejoins the weight broadcast", name,
                       groups_lost + dropped)  # fmt: skip
        self.incarnations[index] = self._incarnation(index)
        self.restarted.add(index)
        self.restarts += 1
        self.lost_groups += groups_lost + dropped
