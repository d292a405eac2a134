"""The driver's side of generation: keeps the rollout actors working, collects batches, and heals restarted actors.

Two modes (trainer.mode):
- sync: the driver asks for exactly the groups the batch still needs (trainer.groups_per_step minus what the buffer
  holds, split evenly over the actors, at most actors.states_per_round each: `run_round(n)`), waits for every round,
  and asks again for any shortfall (states whose game raised, groups the buffer dropped). Nothing is made that the
  batch does not take, so no group waits in the buffer across a broadcast and none is dropped as stale: the learner
  trains on groups of the engines' version (the paper's on-policy loop).
- async: actors keep generating while the learner trains; the learner takes a batch as soon as the buffer has one,
  so generation overlaps training. A round is started only when the buffer has room for all of its groups, so a
  producer never blocks on a full buffer while the learner waits for it at a broadcast. With weight_sync.every_steps
  = k, the round a broadcast waits for was made with the previous broadcast's weights, k versions back: its groups
  are kept only when buffer.max_staleness >= k (launch/config.py checks it). Groups made beyond what the next k
  batches take can grow staler than that; the buffer drops and counts them (buffer/dropped).

Either way a weight broadcast needs every engine between rounds (`wait_idle`): all engines take part in it.

Versions: a policy version names the learner's weights; every update makes a new one (`learner_stepped`: the step,
or one above the last when a learner restart went back to an older step), whether or not it is broadcast at once. A
repair broadcast (an actor restarted between two regular broadcasts) sends the learner's current weights to every
engine, so it carries their version, not the one the engines held.

Lost groups are counted once, in faults/lost_groups: the groups an interrupted round never handed to the buffer
(those it did are accounted by the buffer), a dead actor's groups still in the buffer (`drop_actor`; not repeated in
buffer/dropped), and the whole batch of an update skipped because some of its groups died with their actor.

A rollout actor that dies is restarted by Ray (max_restarts=-1). Its in-flight round is lost and counted, the groups
it had put in the buffer are dropped (their objects died with their owner) and counted, and before it generates
again the weight-sync group is rebuilt with it, whose first broadcast sends every weight. A restarted actor gives
itself away by its incarnation (a new id per process), checked on every round it returns and before every
broadcast, so a death while the actor was idle, which raises nothing, is found too. A death during a broadcast fails
the broadcast (learner.WeightSyncError); the group is rebuilt with the restarted actor and the broadcast repeated.

A learner group that died is replaced (launch/train.py restores a new one from the latest checkpoint): the actors
stay up, and the next broadcast rebuilds the weight-sync group with the new learner rank 0 and sends every weight.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError

from launch.cluster import RolloutFleet
from launch.config import TrainConfig
from launch.monitor import fleet_metrics, reduce_rounds
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
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # run_round result -> (actor index, states asked)
        self.finished: list[tuple[int, Any]] = []  # (actor index, RoundStats) of the rounds since the last batch
        self.offered = [0] * len(fleet.actors)  # groups each actor's finished rounds offered the buffer
        self.engine_version = 0  # the version every engine holds since the last broadcast
        self.learner_version = 0  # the version of the learner's current weights (>= engine_version)
        self.batch_returned = time.monotonic()  # when `collect` last returned: the start of a step's window
        self.incarnations = ray.get([actor.get_incarnation.remote() for actor in fleet.actors])
        self.restarted: set[int] = set()  # actors restarted since the weight-sync group was built
        self.restarts = 0
        self.learner_restarts = 0
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
        self.learner_version = max(self.learner_version, version)
        return stats

    def learner_stepped(self, step: int) -> int:
        """Records a learner update: its weights get a new version, the step unless a learner restart went back to
        an older step (then one above the last: versions only increase). Returns that version."""
        self.learner_version = max(step, self.learner_version + 1)
        return self.learner_version

    def replace_learners(self, learners: Any) -> None:
        """Takes a new learner group in place of one that died; the next `sync_weights` sends it every weight."""
        self.learners = learners
        self.sync_group_broken = True  # its sender died with the old group
        self.learner_restarts += 1

    # ---- one batch ------------------------------------------------------------------------------------------------
    def collect(self) -> tuple[list[Any], dict[str, float]]:
        """Generates until the buffer holds trainer.groups_per_step groups, and takes them.

        Returns:
            The batch's BufferItems, and the step's rollout metrics: those of the rounds that finished meanwhile
            (launch.monitor.reduce_rounds), the fleet's rates and idle shares (launch.monitor.fleet_metrics).
        """
        started = time.monotonic()
        batch = self.config.trainer.groups_per_step
        timeout = self.config.trainer.round_timeout_s
        deadline = started + timeout
        if self.config.trainer.mode == "sync":
            while (short := batch - self._buffered()) > 0:
                if self.restarted:
                    self.sync_weights(self.learner_version)
                for index, num_states in enumerate(self._shares(short)):
                    if num_states:
                        self._launch(index, num_states)
                self.wait_idle()
                if time.monotonic() > deadline:
                    break
            items = ray.get(self.buffer.get.remote(batch, 0))
        else:
            if self.restarted:
                self.sync_weights(self.learner_version)
            self._keep_busy()
            pending = self.buffer.get.remote(batch, timeout)
            while True:
                ready, _ = ray.wait([pending, *self.in_flight], num_returns=1)
                if ready[0] == pending:
                    break
                self._harvest(ready[0])
                if self.restarted:
                    self.sync_weights(self.learner_version)
                self._keep_busy()
            items = ray.get(pending)
        if len(items) < batch:
            raise RuntimeError(
                f"the rollout actors produced {len(items)} of {batch} groups in trainer.round_timeout_s={timeout}s; "
                "see the actors' logs (ray logs, or the dashboard)"
            )
        now = time.monotonic()
        rounds, self.finished = self.finished, []
        metrics = reduce_rounds([stats.to_metrics() for _, stats in rounds])
        metrics.update(fleet_metrics(rounds, len(self.fleet.actors), now - self.batch_returned, now - started))
        self.batch_returned = now
        return items, metrics

    def wait_idle(self) -> None:
        """Waits until no round is in flight (harvesting their metrics and any actor deaths)."""
        while self.in_flight:
            self._harvest(next(iter(self.in_flight)))

    def counters(self) -> dict[str, float]:
        """Fault counters for TensorBoard."""
        return {
            "faults/actor_restarts": float(self.restarts),
            "faults/learner_restarts": float(self.learner_restarts),
            "faults/lost_groups": float(self.lost_groups),
        }

    def stop(self) -> None:
        """Drops the rounds still in flight (end of run or error)."""
        for ref in list(self.in_flight):
            ray.cancel(ref, force=False)
        self.in_flight.clear()

    # ---- internals ------------------------------------------------------------------------------------------------
    def _buffered(self) -> int:
        return ray.get(self.buffer.stats.remote()).size

    def _shares(self, groups: int) -> list[int]:
        """Sync mode: `groups` split evenly over the actors, at most actors.states_per_round each."""
        actors, per_round = len(self.fleet.actors), self.config.actors.states_per_round
        groups = min(groups, actors * per_round)
        return [groups // actors + (index < groups % actors) for index in range(actors)]

    def _keep_busy(self) -> None:
        """Async mode: a round on every idle actor, as long as the buffer has room for all the rounds in flight."""
        per_round = self.config.actors.states_per_round
        room = self.config.buffer.capacity - self._buffered() - sum(n for _, n in self.in_flight.values())
        busy = {index for index, _ in self.in_flight.values()}
        for index in sorted(set(range(len(self.fleet.actors))) - busy):
            if room < per_round:
                break
            self._launch(index, per_round)
            room -= per_round

    def _launch(self, index: int, num_states: int) -> None:
        self.in_flight[self.fleet.actors[index].run_round.remote(num_states)] = (index, num_states)

    def _harvest(self, ref: ray.ObjectRef) -> None:
        """Takes one finished round: its metrics, or, if its actor died or came back restarted, the loss."""
        index, num_states = self.in_flight.pop(ref)
        try:
            stats = ray.get(ref).stats
        except RayActorError as e:
            logger.warning("%s died during a round (%s); Ray restarts it", self.fleet.names[index], type(e).__name__)
            self._restart_found(index, interrupted=num_states)
            return
        self.offered[index] += stats.num_groups
        self.finished.append((index, stats))
        if stats.incarnation != self.incarnations[index]:  # restarted while idle: it generated with initial weights
            self._restart_found(index, interrupted=0)  # its groups are in the buffer: dropped and counted there

    def _find_idle_restarts(self) -> None:
        """Asks every actor for its incarnation: a new one is a restart that raised nothing (it died between rounds
        or during a broadcast)."""
        for index in range(len(self.fleet.actors)):
            if self._incarnation(index) != self.incarnations[index]:
                self._restart_found(index, interrupted=0)

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

    def _restart_found(self, index: int, interrupted: int) -> None:
        """Counts a restart and its losses, each group once; the actor's groups in the buffer are dropped (their
        owner died).

        Args:
            index: the actor.
            interrupted: states of the round it died in (0: it died between rounds). Those of its groups that reached
                the buffer before the death are not counted here: the buffer accounts for them (trained, dropped
                below, or dropped at `put` for its own reasons).
        """
        name = self.fleet.names[index]
        offered = ray.get(self.buffer.stats.remote()).offered_by_actor.get(name, 0)
        reached, self.offered[index] = offered - self.offered[index], offered
        dropped = ray.get(self.buffer.drop_actor.remote(name))
        lost = max(0, interrupted - reached) + dropped
        logger.warning("%s was restarted: %d groups lost; it rejoins the weight broadcast", name, lost)
        self.incarnations[index] = self._incarnation(index)
        self.restarted.add(index)
        self.restarts += 1
        self.lost_groups += lost
