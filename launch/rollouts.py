"""The driver's side of generation: keeps the rollout actors working, collects batches, and heals restarted actors.

Two modes (trainer.mode):
- sync: the driver asks for exactly the groups the batch still needs (trainer.groups_per_step minus what the buffer
  holds, split evenly over the actors, at most actors.states_per_round each: `run_round(n)`), waits for every round,
  and asks again for any shortfall (states whose game raised, groups the buffer dropped). Nothing is made that the
  batch does not take, so no group waits in the buffer across a broadcast and none is dropped as stale: the learner
  trains on groups of the engines' version (the paper's on-policy loop). A broadcast waits for the engines to be idle
  (`wait_idle`), which they are between batches.
- async: every actor generates continuously (`RolloutActor.stream`, started once and again after a restart) and
  pushes its groups to the buffer as they finish; the learner takes a batch as soon as the buffer holds one, so
  generation and training overlap fully. A broadcast does not wait for anything: each engine pauses with its
  sequences in flight, loads the new weights and resumes them (an in-flight weight update), so a response may span
  versions; its group carries the oldest (`policy_version`), and buffer.max_staleness bounds it. With
  weight_sync.every_steps = k a group started just before a broadcast is k versions old at the next one: it is kept
  only when buffer.max_staleness >= k (launch/config.py checks it). A full buffer holds the producers back (its
  puts wait), so the actors run at most a buffer ahead of the learner. The step's rollout metrics are the actors'
  own since the previous batch (`drain_stats`).

Versions: a policy version names the learner's weights; every update makes a new one (`learner_stepped`: the step,
or one above the last when a learner restart went back to an older step), whether or not it is broadcast at once.
`learner_version` is the run's one counter of them. Every broadcast sets the buffer's version to the version sent,
so a repair broadcast (an actor restarted between two regular broadcasts), which sends the learner's current weights
and thus their version, moves the buffer on with the engines (a group's staleness is never negative).

Lost groups are counted once, in faults/lost_groups: the groups an interrupted round never handed to the buffer
(those it did are accounted by the buffer), a dead actor's groups still in the buffer (`drop_actor`; not repeated in
buffer/dropped), the groups a dead buffer held, and the whole batch of an update skipped because some of its groups
died with their actor. A streaming actor that dies loses the states it was generating, which were never groups:
they are not counted. `ledger` sums it all up (made = taken + dropped + lost + held when no fault interfered).

A rollout actor that dies is restarted by Ray (max_restarts=-1). Its in-flight round is lost and counted, the groups
it had put in the buffer are dropped (their objects died with their owner) and counted, and before it generates
again the weight-sync group is rebuilt with it, whose first broadcast sends every weight. A restarted actor gives
itself away by its incarnation (a new id per process), checked on every round it returns and before every
broadcast, so a death while the actor was idle, which raises nothing, is found too; a streaming actor's death fails
its `stream` call. A death during a broadcast fails the broadcast (learner.WeightSyncError); the group is rebuilt
with the restarted actor and the broadcast repeated. An error raised inside an actor's call (a RayTaskError, which
Ray also reports when a call the actor made to the buffer found the buffer dead) is not its death: the actor lives.

The buffer actor is restartable too (launch/cluster.py): Ray sends the puts and gets in flight to the new one, which
starts empty. The driver notices by the buffer's incarnation, counts the groups the old one held when it last
looked as lost (those stored after that look are lost uncounted), and gives the new one the policy version.

A learner group that died is replaced (launch/train.py restores a new one from the latest checkpoint): the actors
stay up, and the next broadcast rebuilds the weight-sync group with the new learner rank 0 and sends every weight.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from launch.cluster import RolloutFleet
from launch.config import TrainConfig, stream_slots
from launch.monitor import fleet_metrics, reduce_rounds
from learner import WeightSyncError
from replay.buffer import BufferStats

logger = logging.getLogger(__name__)

SYNC_ATTEMPTS = 3  # a broadcast that fails this many times in a row (new group each time) is not a lost actor: raise
STOP_TIMEOUT_S = 60.0  # how long `stop` waits for the streams to end (their in-flight groups pushed)
SHUTDOWN_TIMEOUT_S = 30.0  # how long `stop` waits for the actors' engines to shut down, all together, before the kill


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
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # sync: run_round result -> (actor, states asked)
        self.streams: dict[int, ray.ObjectRef] = {}  # async: actor index -> its running `stream` call
        self.finished: list[tuple[int, Any]] = []  # (actor index, RoundStats) since the last batch
        self.offered = [0] * len(fleet.actors)  # groups each actor's reported stats offered the buffer
        self.engine_version = 0  # the version every engine holds since the last broadcast
        self.learner_version = 0  # the version of the learner's current weights (>= engine_version)
        self.batch_returned = time.monotonic()  # when `collect` last returned: the start of a step's window
        self.incarnations = ray.get([actor.get_incarnation.remote() for actor in fleet.actors])
        self.restarted: set[int] = set()  # actors restarted since the weight-sync group was built
        self.restarts = 0
        self.learner_restarts = 0
        self.buffer_restarts = 0
        self.lost_groups = 0  # groups of interrupted rounds, of dead actors, of a dead buffer, of skipped updates
        self.made = 0  # groups the actors reported (RoundStats.num_groups), for `ledger`
        self.taken = 0  # groups handed to the learner
        self.sync_group_broken = False  # a broadcast failed: the group must be rebuilt before the next one
        self.buffer_seen = ray.get(buffer.stats.remote())  # the buffer at the driver's last look

    # ---- weights --------------------------------------------------------------------------------------------------
    def sync_weights(self, version: int) -> Any:
        """Broadcasts the learner's weights (as `version`) to every engine, restarted ones included, and sets the
        buffer's version to it.

        Sync mode waits for the rounds in flight first; streaming actors take the weights mid-generation. An actor
        that dies during the broadcast, or while a new group forms, fails it (learner.WeightSyncError) and leaves
        the sync group unusable: the group is rebuilt with the restarted actor and the broadcast, now a full one,
        tried again.

        Returns:
            The broadcast's SyncStats.
        """
        self.wait_idle()  # sync mode: every engine takes part in the broadcast, none may be in a round
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
        ray.get(self.buffer.set_policy_version.remote(version))
        return stats

    def learner_stepped(self, step: int) -> int:
        """Records a learner update: its weights get a new version, the step unless a learner restart went back to
        an older step (then one above the last: versions only increase). Returns that version."""
        self.learner_version = max(step, self.learner_version + 1)
        return self.learner_version

    def replace_learners(self, learners: Any) -> int:
        """Takes a new learner group in place of one that died; the next `sync_weights` sends it every weight.

        Returns:
            The restored weights' version: one above the learner's last (versions only increase).
        """
        self.learners = learners
        self.sync_group_broken = True  # its sender died with the old group
        self.learner_restarts += 1
        self.learner_version += 1
        return self.learner_version

    # ---- one batch ------------------------------------------------------------------------------------------------
    def collect(self) -> tuple[list[Any], dict[str, float]]:
        """Generates until the buffer holds trainer.groups_per_step groups, and takes them.

        Returns:
            The batch's BufferItems, and the step's rollout metrics: those of the rounds (or streams) since the last
            batch (launch.monitor.reduce_rounds), the fleet's rates and idle shares (launch.monitor.fleet_metrics).
        """
        started = time.monotonic()
        batch = self.config.trainer.groups_per_step
        timeout = self.config.trainer.round_timeout_s
        collect = self._collect_sync if self.config.trainer.mode == "sync" else self._collect_async
        items = collect(batch, timeout)
        if len(items) < batch:
            raise RuntimeError(
                f"the rollout actors produced {len(items)} of {batch} groups in trainer.round_timeout_s={timeout}s; "
                "see the actors' logs (ray logs, or the dashboard)"
            )
        self.taken += len(items)
        now = time.monotonic()
        rounds, self.finished = self.finished, []
        metrics = reduce_rounds([stats.to_metrics() for _, stats in rounds])
        metrics.update(fleet_metrics(rounds, len(self.fleet.actors), now - self.batch_returned, now - started))
        self.batch_returned = now
        return items, metrics

    def _collect_sync(self, batch: int, timeout: float) -> list[Any]:
        """Rounds of exactly what the batch still needs, until the buffer holds it (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while (short := batch - self.buffer_stats().size) > 0:
            if self.restarted:
                self.sync_weights(self.learner_version)
            for index, num_states in enumerate(self._shares(short)):
                if num_states:
                    self._launch(index, num_states)
            self.wait_idle()
            if time.monotonic() > deadline:
                break
        return self._take(batch, 0)

    def _collect_async(self, batch: int, timeout: float) -> list[Any]:
        """Waits for a batch while every actor streams; a stream that ends (its actor died) is healed and restarted."""
        if self.restarted:
            self.sync_weights(self.learner_version)
        self._start_streams()
        pending = self.buffer.get.remote(batch, timeout)
        while True:
            ready, _ = ray.wait([pending, *self.streams.values()], num_returns=1)
            if ready[0] == pending:
                break
            self._stream_ended(ready[0])
            if self.restarted:
                self.sync_weights(self.learner_version)
            self._start_streams()
        items = ray.get(pending)
        self._drain()
        self.buffer_stats()  # a buffer restarted during the wait: its get was sent to the new one
        return items

    def _take(self, batch: int, timeout: float) -> list[Any]:
        items = ray.get(self.buffer.get.remote(batch, timeout))
        self.buffer_stats()
        return items

    def wait_idle(self) -> None:
        """Waits until no round is in flight (harvesting their metrics and any actor deaths)."""
        while self.in_flight:
            self._harvest(next(iter(self.in_flight)))

    def buffer_stats(self) -> BufferStats:
        """The buffer's stats; a restarted buffer (a new incarnation) is found here and its loss counted."""
        stats = ray.get(self.buffer.stats.remote())
        if stats.incarnation != self.buffer_seen.incarnation:
            lost = self.buffer_seen.size + self.buffer_seen.blocked_puts
            logger.warning("the replay buffer was restarted: the %d groups it held are lost", lost)
            self.buffer_restarts += 1
            self.lost_groups += lost
            self.offered = [0] * len(self.fleet.actors)  # the new buffer counts offers from 0
            ray.get(self.buffer.set_policy_version.remote(self.engine_version))
            stats = ray.get(self.buffer.stats.remote())
        self.buffer_seen = stats
        return stats

    def counters(self) -> dict[str, float]:
        """Fault counters for TensorBoard."""
        return {
            "faults/actor_restarts": float(self.restarts),
            "faults/learner_restarts": float(self.learner_restarts),
            "faults/buffer_restarts": float(self.buffer_restarts),
            "faults/lost_groups": float(self.lost_groups),
        }

    def ledger(self) -> dict[str, int]:
        """Where every group the actors reported went: made = taken + dropped + lost + held, unless a fault lost
        groups that no report covered (a dead buffer's last ones, a dead actor's unreported ones)."""
        stats = self.buffer_stats()
        return {
            "made": self.made,
            "taken": self.taken,
            "dropped": stats.dropped - stats.drops["actor_died"],  # the dead actors' ones are in `lost`
            "lost": self.lost_groups,
            "held": stats.size + stats.blocked_puts,
        }

    def stop(self) -> None:
        """Ends generation and the rollout actors (end of run or error): rounds in flight are dropped; streams are
        stopped, the buffer is closed (a producer waiting for room drops its groups as "closed" instead of waiting for
        ever), and their last stats collected (so that `ledger` covers every group they made); then every actor shuts
        its engine down and is killed (`_shut_down`)."""
        for ref in list(self.in_flight):
            ray.cancel(ref, force=False)
        self.in_flight.clear()
        try:
            if self.streams:
                self._stop_streams()
        finally:
            self._shut_down()

    def _stop_streams(self) -> None:
        for index in self.streams:
            self.fleet.actors[index].stop_stream.remote()
        self.buffer.close.remote()
        refs = list(self.streams.values())
        ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        self.streams.clear()
        self._drain()

    def _shut_down(self) -> None:
        """Asks every actor to shut its engine down (`RolloutActor.shutdown`), then kills it. An actor killed with its
        engine running takes the engine-core process with it in any order, and vLLM's output handler, seeing that
        process die first, prints an EngineDeadError traceback at the end of every run. A dead or hung actor holds the
        stop up for SHUTDOWN_TIMEOUT_S at most (all actors together), and is killed all the same."""
        refs = [actor.shutdown.remote() for actor in self.fleet.actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
        if pending:
            hung = [self.fleet.names[refs.index(ref)] for ref in pending]
            logger.warning("%s did not shut down in %.0fs; killed", ", ".join(hung), SHUTDOWN_TIMEOUT_S)
        for actor in self.fleet.actors:
            ray.kill(actor, no_restart=True)

    # ---- internals ------------------------------------------------------------------------------------------------
    def _shares(self, groups: int) -> list[int]:
        """Sync mode: `groups` split evenly over the actors, at most actors.states_per_round each."""
        actors, per_round = len(self.fleet.actors), self.config.actors.states_per_round
        groups = min(groups, actors * per_round)
        return [groups // actors + (index < groups % actors) for index in range(actors)]

    def _launch(self, index: int, num_states: int) -> None:
        self.in_flight[self.fleet.actors[index].run_round.remote(num_states)] = (index, num_states)

    def _start_streams(self) -> None:
        """Async mode: a `stream` on every actor that has none (at the start, and after a restart)."""
        for index, actor in enumerate(self.fleet.actors):
            if index not in self.streams:
                self.streams[index] = actor.stream.remote(stream_slots(self.config))

    def _stream_ended(self, ref: ray.ObjectRef) -> None:
        """A stream returned before `stop`: its actor died (restart found), the buffer died under its put (its
        unpushed groups lost; the stream starts again), or its call raised (the run stops)."""
        index = next(i for i, r in self.streams.items() if r == ref)
        name = self.fleet.names[index]
        del self.streams[index]
        try:
            summary = ray.get(ref)
        except RayTaskError as e:
            raise self._call_failed(index, e) from e
        except RayActorError as e:
            logger.warning("%s died while streaming (%s); Ray restarts it", name, type(e).__name__)
            self._restart_found(index, interrupted=0)  # its states in flight were never groups
            return
        if summary.ended_by != "buffer_dead":
            raise RuntimeError(f"{name}'s stream ended before it was stopped ({summary.ended_by})")
        logger.warning("the replay buffer died under %s's put: %d groups lost", name, summary.num_unpushed)
        self.lost_groups += summary.num_unpushed

    def _drain(self) -> None:
        """Async mode: every live actor's stats since its last report (into `finished`)."""
        refs = {index: actor.drain_stats.remote() for index, actor in enumerate(self.fleet.actors)}
        for index, ref in refs.items():
            try:
                stats = ray.get(ref)
            except RayTaskError as e:
                raise self._call_failed(index, e) from e
            except RayActorError:
                continue  # died: its stream's failure reports it
            if stats is not None and stats.incarnation == self.incarnations[index]:
                self._reported(index, stats)

    def _reported(self, index: int, stats: Any) -> None:
        self.offered[index] += stats.num_groups
        self.made += stats.num_groups
        self.finished.append((index, stats))

    def _harvest(self, ref: ray.ObjectRef) -> None:
        """Takes one finished round: its metrics, or, if its actor died or came back restarted, the loss."""
        index, num_states = self.in_flight.pop(ref)
        try:
            stats = ray.get(ref).stats
        except RayTaskError as e:
            raise self._call_failed(index, e) from e
        except RayActorError as e:
            logger.warning("%s died during a round (%s); Ray restarts it", self.fleet.names[index], type(e).__name__)
            self._restart_found(index, interrupted=num_states)
            return
        self._reported(index, stats)
        if stats.incarnation != self.incarnations[index]:  # restarted while idle: it generated with initial weights
            self._restart_found(index, interrupted=0)  # its groups are in the buffer: dropped and counted there

    def _call_failed(self, index: int, error: RayTaskError) -> RuntimeError:
        """The error to stop the run with when an actor's call raised: the actor lives, so it is no restart. Ray
        reports a call the actor made to a dead actor (the buffer, if Ray could not restart it) as an actor-died
        error too, wrapped in the RayTaskError: that one is named as the buffer's."""
        name = self.fleet.names[index]
        if isinstance(error, RayActorError):
            return RuntimeError(f"{name}'s call to the replay buffer failed: the buffer died and did not come back")
        return RuntimeError(f"{name} raised (it is still alive): {error}")

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
            interrupted: states of the round it died in (0: it died between rounds, or while streaming). Those of its
                groups that reached the buffer before the death are not counted here: the buffer accounts for them
                (trained, dropped below, or dropped at `put` for its own reasons).
        """
        name = self.fleet.names[index]
        offered = self.buffer_stats().offered_by_actor.get(name, 0)
        reached, self.offered[index] = offered - self.offered[index], offered
        self.made += reached  # groups it made but never reported: the buffer saw them
        dropped = ray.get(self.buffer.drop_actor.remote(name))
        lost = max(0, interrupted - reached) + dropped
        logger.warning("%s was restarted: %d groups lost; it rejoins the weight broadcast", name, lost)
        self.incarnations[index] = self._incarnation(index)
        self.streams.pop(index, None)  # a stream of the dead process: its failure is this restart
        self.restarted.add(index)
        self.restarts += 1
        self.lost_groups += lost
