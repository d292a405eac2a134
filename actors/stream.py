"""One `RolloutActor.stream` call: continuous generation into the replay buffer, in three threads.

    preparer thread: pool.sample + chat prompt + engine input rendered (tokens, image processed), one state at a
                     time, into a bounded queue
    caller's thread: a state goes to the engine (n = G samples) whenever one of `max_states_in_flight` slots is free
    pusher thread:   finished requests -> scored on clones -> TrajectoryGroups -> ONE buffer.put_many per batch;
                     at most max_states_in_flight states are submitted and not yet pushed, so a full buffer
                     stalls generation (bounded memory) and a state waits behind at most the buffer and those
                     (launch.config.stream_slots: the staleness bound)

So game stepping, rendering, image processing and scoring overlap decoding, and the engine is refilled as soon as a
request ends. The run schedules; everything else is the actor's own, passed to it explicitly as a `StreamSource`:
preparing, submitting, scoring and pushing, and the stats that these keep (the actor's tally and `EngineClock`, shared
with its rounds and read by `drain_stats` while the stream runs).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replay.trajectory import TrajectoryGroup

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often a stream's waiting threads look at the stop flag
PREPARE_FAILURES_IN_A_ROW = 32  # a stream ends with an error after this many states in a row failed to prepare


@dataclass(frozen=True)
class StreamSummary:
    """How one `stream` call ended. Every state submitted is accounted for:
    `num_submitted == num_groups + num_skipped + num_aborted`, and `num_groups == num_pushed + num_unpushed`."""

    ended_by: str  # "stop" (stop_stream), "buffer_closed" or "buffer_dead"
    num_submitted: int  # states given to the engine
    num_groups: int  # trajectory groups made from them
    num_skipped: int  # submitted states whose scoring raised
    num_aborted: int  # requests aborted in flight (only when the buffer ended the stream)
    num_pushed: int  # groups offered to the buffer (put_many calls that returned)
    num_unpushed: int  # groups made but not offered (the buffer was closed or dead)
    num_accepted: int  # groups the buffer stored
    num_unprepared: int  # states whose preparation raised (never submitted)
    stream_s: float


@dataclass
class EngineClock:
    """The time the engine has had requests in flight: a stream's `generation_s`, so that its tokens/s is the
    engine's rate and not diluted by the stream's idle waits. Its users hold the actor's stats lock."""

    in_engine: int = 0  # requests in the engine
    busy_since: float | None = None  # when the time not yet counted began (None: idle)

    def enter(self, now: float) -> None:
        if self.in_engine == 0:
            self.busy_since = now
        self.in_engine += 1

    def leave(self, now: float) -> float:
        """A request ended; returns the busy seconds to count (all of them once the engine is idle, else 0)."""
        self.in_engine -= 1
        if self.in_engine > 0:
            return 0.0
        busy = self.lap(now)
        self.busy_since = None
        return busy

    def lap(self, now: float) -> float:
        """The busy seconds not yet counted, up to `now` (a drain counts them while requests are still in flight)."""
        if self.busy_since is None:
            return 0.0
        busy, self.busy_since = now - self.busy_since, now
        return busy


@dataclass(frozen=True)
class StreamSource:
    """What a stream uses of its actor (built by `RolloutActor.stream`). Each callable keeps the actor's stats itself
    (its tally and engine clock, under its stats lock), so the run only schedules and counts what became of its states.
    A prepared state is opaque here: it goes from `prepare` to `submit` and `score` as it is."""

    name: str  # the actor's: names the run's threads and logs
    state_ids: str  # prefix of the groups' state ids: one per stream of the actor
    stop: threading.Event  # the actor's stop flag: set by stop_stream, and by the run when it ends itself
    prepare: Callable[[], Any]  # the pool's next state, ready for the engine; None (logged) when its game raised
    submit: Callable[[Any], Future]  # a prepared state to the engine, never between a weight pause and its resume
    request_ended: Callable[[], None]  # called on the engine's loop thread as each request ends
    score: Callable[[Any, Any, str], TrajectoryGroup | None]  # (state, output, state id): its group; None if it raised
    push: Callable[[list[TrajectoryGroup]], int]  # one buffer.put_many: groups stored; RayActorError if buffer dead
    buffer_closed: Callable[[], bool]  # whether the buffer was closed (it drops every group offered)


class StreamRun:
    """One `RolloutActor.stream` call: its preparer and pusher threads, its queues and its counts.

    An engine slot is taken before a state is submitted and given back when its request ends; a backlog slot (as
    many) is taken with it and given back once its group was pushed (or it was skipped or aborted). Twice as many
    backlog slots broke `stream_slots`'s staleness bound: up to 2 x slots states ahead of a new one besides the
    buffer, and bench/async.py dropped 4-9 of every ~30 groups as stale; with as many, none. The engine
    is refilled while earlier groups are scored and pushed, and a buffer that takes nothing stops submissions.
    The actor's stop flag ends the stream; the run sets it too when the buffer ends it or a thread fails.
    """

    def __init__(self, source: StreamSource, slots: int) -> None:
        self.source, self.stop = source, source.stop
        self.engine_slots = threading.Semaphore(slots)
        self.backlog = threading.Semaphore(slots)
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=slots)  # states prepared ahead
        self.finished: queue.Queue[tuple[Any, Future]] = queue.Queue()  # requests ended, not yet handled
        self.start = time.perf_counter()
        self.lock = threading.Lock()
        self.in_flight: set[Future] = set()
        self.submitting = True
        self.buffer_gone = threading.Event()  # closed or dead: abort, push nothing more
        self.ended_by = "stop"
        self.error: BaseException | None = None  # raised by `go` once every thread has ended
        self.counts = dict.fromkeys(
            ("submitted", "groups", "skipped", "aborted", "pushed", "unpushed", "accepted", "unprepared", "done"), 0
        )

    def go(self) -> None:
        threads = [
            threading.Thread(target=self._prepare_loop, name=f"{self.source.name}-prepare", daemon=True),
            threading.Thread(target=self._push_loop, name=f"{self.source.name}-push", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            self._submit_loop()
        finally:
            self.stop.set()  # ends the preparer (also when a submission raised)
            with self.lock:
                self.submitting = False
            for thread in threads:
                thread.join()
        if self.error is not None:
            raise self.error

    def summary(self) -> StreamSummary:
        c = self.counts
        return StreamSummary(
            ended_by=self.ended_by,
            num_submitted=c["submitted"],
            num_groups=c["groups"],
            num_skipped=c["skipped"],
            num_aborted=c["aborted"],
            num_pushed=c["pushed"],
            num_unpushed=c["unpushed"],
            num_accepted=c["accepted"],
            num_unprepared=c["unprepared"],
            stream_s=time.perf_counter() - self.start,
        )

    def _fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.stop.set()

    # ---- caller's thread: submissions ---------------------------------------------------------------------------
    def _submit_loop(self) -> None:
        while self._acquire(self.backlog):
            if not self._acquire(self.engine_slots):
                break
            item = self._next_ready()
            if item is None:
                break
            future = self.source.submit(item)
            with self.lock:
                self.counts["submitted"] += 1
                self.in_flight.add(future)
            future.add_done_callback(lambda done, item=item: self._on_done(item, done))
        if self.buffer_gone.is_set() or self.error is not None:
            with self.lock:
                in_flight = list(self.in_flight)
            for future in in_flight:
                future.cancel()  # aborts the request in the engine

    def _acquire(self, slots: threading.Semaphore) -> bool:
        """Takes a slot; False when the stream is stopping instead."""
        while not self.stop.is_set():
            if slots.acquire(timeout=POLL_S):
                return True
        return False

    def _next_ready(self) -> Any:
        while not self.stop.is_set():
            try:
                return self.ready.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    def _on_done(self, item: Any, future: Future) -> None:
        """On the engine's loop thread: the request ended."""
        self.source.request_ended()
        self.engine_slots.release()
        with self.lock:
            self.in_flight.discard(future)
        self.finished.put((item, future))

    # ---- preparer thread ------------------------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        stop, failures = self.stop, 0
        while not stop.is_set():
            item = self.source.prepare()
            if item is None:
                self.counts["unprepared"] += 1
                failures += 1
                if failures >= PREPARE_FAILURES_IN_A_ROW:
                    name = self.source.name
                    self._fail(RuntimeError(f"{name}: {failures} states in a row failed; see the logged errors"))
                continue
            failures = 0
            while not stop.is_set():
                try:
                    self.ready.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue

    # ---- pusher thread --------------------------------------------------------------------------------------------
    def _push_loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                self._push_batch(batch)
            except BaseException as e:  # an engine or scoring bug: end the stream, raise it from `stream`
                self._fail(e)
            finally:
                with self.lock:
                    self.counts["done"] += len(batch)
                for _ in batch:
                    self.backlog.release()

    def _take_batch(self) -> list[tuple[Any, Future]] | None:
        """The requests finished so far (at least one); None once submitting ended and every request was handled."""
        while True:
            try:
                batch = [self.finished.get(timeout=POLL_S)]
                break
            except queue.Empty:
                with self.lock:
                    if not self.submitting and self.counts["done"] == self.counts["submitted"]:
                        return None
        while True:
            try:
                batch.append(self.finished.get_nowait())
            except queue.Empty:
                return batch

    def _push_batch(self, batch: list[tuple[Any, Future]]) -> None:
        import ray

        source, groups = self.source, []
        for item, future in batch:
            if future.cancelled() or self.buffer_gone.is_set():
                self.counts["aborted"] += 1
                continue
            output = future.result()  # an engine error ends the stream (raised from `stream`)
            serial = self.counts["groups"] + self.counts["skipped"]
            group = source.score(item, output, f"{source.state_ids}-{serial}")
            if group is None:
                self.counts["skipped"] += 1
            else:
                self.counts["groups"] += 1
                groups.append(group)
        try:
            accepted = source.push(groups)
        except ray.exceptions.RayActorError:
            logger.warning("%s: the buffer is dead; the stream ends", source.name)
            self._buffer_ended("buffer_dead")
            self.counts["unpushed"] += len(groups)
        else:
            self.counts["pushed"] += len(groups)
            self.counts["accepted"] += accepted
            if accepted < len(groups) and source.buffer_closed():
                self._buffer_ended("buffer_closed")

    def _buffer_ended(self, reason: str) -> None:
        self.ended_by = reason
        self.buffer_gone.set()
        self.stop.set()
