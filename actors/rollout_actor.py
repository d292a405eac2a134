"""The rollout actor: a game pool and its own vLLM engine, turning game states into scored trajectory groups.

Two ways to run it (sync and async training, launch/rollouts.py):

One round (`run_round`, sync mode: exactly on-policy):
    pool.sample (reset + K random steps, or continued episodes; rendered)  -> chat prompts with the board image
    -> states x G samples submitted to the engine at once (temperature, top-p, max tokens from RolloutConfig)
    -> every response scored on its own clone of its state (pool.score -> envs.score)
    -> one TrajectoryGroup per state, stamped with the policy version -> ray.put + buffer.put (or returned)

A stream (`stream`, async mode), until `stop_stream`:
    preparer thread: pool.sample + chat prompt + engine input, one state at a time, into a bounded queue
    this thread:     a state goes to the engine (n = G samples) whenever one of `max_states_in_flight` slots is free
    pusher thread:   finished requests -> scored on clones -> TrajectoryGroups -> ONE buffer.put_many per batch;
                     at most 2 x max_states_in_flight states are submitted and not yet pushed, so a full buffer
                     stalls generation (bounded memory)
Weights arrive while streaming (`receive_weights`, `load_weights`): the engine pauses its requests in flight (vLLM's
"keep"), loads, and resumes them with the new weights; each response records the versions it spans
(`TrajectoryGroup.response_versions`), its group the oldest.

A plain class: launch/cluster.py applies `ray.remote` (with max_concurrency, so `stop_stream`, `drain_stats` and weight
updates run while `stream` does) and tests build it directly or remotely. An error in one game (sampling or scoring a
state) is logged and that state skipped; the actor keeps going.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from actors.config import RolloutConfig
from actors.models import ModelSource
from actors.prompts import chat_prompt, engine_input
from actors.vllm_engine import VLLMEngine
from envs import GamePool, PoolConfig, PooledState
from replay.buffer import REWARD_PARTS
from replay.trajectory import TrajectoryGroup

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often a stream's waiting threads look at the stop flag
PREPARE_FAILURES_IN_A_ROW = 32  # a stream ends with an error after this many states in a row failed to prepare


@dataclass(frozen=True)
class RoundStats:
    """What one round, or a stream since the last `drain_stats`, did and how fast (one actor). `to_metrics` gives
    the TensorBoard tags of design.md. For a stream, `generation_s` is the time the engine had requests in flight,
    and `env_s` the time spent preparing and scoring (in threads beside generation, so it may overlap it)."""

    policy_version: int  # weights that generated the round; a stream's: the engine's at the drain
    incarnation: str  # the actor process that made it (a restart makes a new one)
    num_groups: int  # trajectory groups produced (states that made it through)
    num_skipped: int  # states skipped because their game raised
    num_responses: int  # num_groups x G
    num_accepted: int  # groups the buffer stored (it may drop stale ones); num_groups without a buffer
    tokens_generated: int  # response tokens, all groups
    generation_s: float  # inside engine.generate
    env_s: float  # preparing states (games, renders, prompts); decoding and scoring responses
    push_s: float  # ray.put + buffer.put, back-pressure waits included (0 without a buffer)
    round_s: float  # wall time of the whole round
    tokens_per_s: float  # tokens_generated / generation_s
    env_steps: int  # game steps: random steps after resets, one per scored response, continued-episode moves
    env_steps_per_s: float  # env_steps / env_s
    invalid_action_rate: float  # share of responses without a valid action
    truncated_rate: float  # share of responses cut by max_new_tokens (no <|im_end|>)
    reward_mean: dict[str, float]  # REWARD_PARTS -> mean over all responses
    reward_mean_by_game: dict[str, dict[str, float]] = field(default_factory=dict)  # game -> part -> mean
    num_submitted: int = 0  # states given to the engine (a stream's; a round's: num_groups + scoring skips)

    @property
    def outside_generation_share(self) -> float:
        """Share of the round's wall time the engine had nothing to generate (the actor's overhead)."""
        return 1.0 - self.generation_s / self.round_s if self.round_s > 0 else 0.0

    def to_metrics(self) -> dict[str, float]:
        """Flat, namespaced scalars (`rollout/reward_total`, `rollout/<game>/reward_total` when several games,
        `perf/...`). The rewards are of generation; `reward/*` are the trained batch's (launch/monitor.py)."""
        metrics = {f"rollout/reward_{part}": value for part, value in self.reward_mean.items()}
        if len(self.reward_mean_by_game) > 1:
            for game, parts in self.reward_mean_by_game.items():
                metrics.update({f"rollout/{game}/reward_{part}": value for part, value in parts.items()})
        metrics.update(
            {
                "perf/gen_tokens_per_s": self.tokens_per_s,
                "perf/env_steps_per_s": self.env_steps_per_s,
                "perf/rollout_round_s": self.round_s,
                "perf/rollout_outside_generation_share": self.outside_generation_share,
                "rollout/invalid_action_rate": self.invalid_action_rate,
                "rollout/truncated_rate": self.truncated_rate,
                "rollout/num_groups": float(self.num_groups),
                "rollout/num_skipped": float(self.num_skipped),
            }
        )
        return metrics


@dataclass
class RoundResult:
    """A round's statistics, and its groups when the actor has no buffer (empty when they went to the buffer)."""

    stats: RoundStats
    groups: list[TrajectoryGroup]


def _retain_freed_memory() -> None:
    """Keeps freed memory (up to 512 MiB) in this process's heap instead of returning it to the OS (glibc only).

    Each round renders and then drops tens of MB of board images. By default glibc serves such large blocks with
    fresh mmaps and unmaps them on free, so the next round's tensors page-fault their memory in again: measured here,
    that made the actor's generate calls ~6% slower than the same calls in a fresh process. Blocks under 64 MiB now
    come from the heap and stay mapped. A no-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from malloc.h
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


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
class _Tally:
    """Running sums over the groups of a round, or of a stream since the last `drain_stats` (no groups kept)."""

    start: float
    num_groups: int = 0
    num_skipped: int = 0
    num_submitted: int = 0
    num_accepted: int = 0
    env_steps: int = 0
    tokens: int = 0
    responses: int = 0
    invalid: int = 0
    truncated: int = 0
    generation_s: float = 0.0
    env_s: float = 0.0
    push_s: float = 0.0
    reward_sums: dict[str, dict[str, float]] = field(default_factory=dict)  # game -> REWARD_PARTS -> sum
    responses_by_game: dict[str, int] = field(default_factory=dict)

    def add(self, group: TrajectoryGroup) -> None:
        self.num_groups += 1
        self.tokens += sum(len(ids) for ids in group.response_ids)
        self.responses += group.group_size
        self.invalid += sum(not r.valid_action for r in group.rewards)
        self.truncated += sum(not ok for ok in group.finished)
        sums = self.reward_sums.setdefault(group.game, dict.fromkeys(REWARD_PARTS, 0.0))
        for part in REWARD_PARTS:
            sums[part] += sum(getattr(r, part) for r in group.rewards)
        self.responses_by_game[group.game] = self.responses_by_game.get(group.game, 0) + group.group_size

    def stats(self, version: int, incarnation: str, end: float) -> RoundStats:
        def means(games: list[str]) -> dict[str, float]:
            count = sum(self.responses_by_game[g] for g in games)
            return {p: sum(self.reward_sums[g][p] for g in games) / count if count else 0.0 for p in REWARD_PARTS}

        share = (lambda n: n / self.responses) if self.responses else (lambda n: 0.0)
        return RoundStats(
            policy_version=version,
            incarnation=incarnation,
            num_groups=self.num_groups,
            num_skipped=self.num_skipped,
            num_responses=self.responses,
            num_accepted=self.num_accepted,
            tokens_generated=self.tokens,
            generation_s=self.generation_s,
            env_s=self.env_s,
            push_s=self.push_s,
            round_s=end - self.start,
            tokens_per_s=self.tokens / self.generation_s if self.generation_s > 0 else 0.0,
            env_steps=self.env_steps,
            env_steps_per_s=self.env_steps / self.env_s if self.env_s > 0 else 0.0,
            invalid_action_rate=share(self.invalid),
            truncated_rate=share(self.truncated),
            reward_mean=means(list(self.reward_sums)),
            reward_mean_by_game={game: means([game]) for game in sorted(self.reward_sums)},
            num_submitted=self.num_submitted,
        )


@dataclass
class _Prepared:
    """A state ready for the engine."""

    state: PooledState
    prompt_text: str
    engine_input: dict[str, Any]


class RolloutActor:
    """A game pool and a vLLM engine that produce trajectory groups.

    Args:
        config: engine and sampling settings.
        pool: the game mix; actor i plays it with seed `pool.seed + i`.
        model: the resolved model (actors.models.resolve_model) or a local model directory.
        actor_id: index of this actor; names it (`rollout-<i>`) and offsets its seeds.
        buffer: a handle to the replay buffer actor (`replay.ReplayBuffer` under ray.remote); None returns the groups
            from `run_round` instead (`stream` needs a buffer).
    """

    def __init__(
        self,
        config: RolloutConfig,
        pool: PoolConfig,
        model: ModelSource | str | os.PathLike,
        actor_id: int = 0,
        buffer: Any | None = None,
    ) -> None:
        _retain_freed_memory()
        self.config = config
        self.name = f"rollout-{actor_id}"
        # Changes when Ray restarts this actor: the driver tells a restarted actor (initial weights, not in the
        # weight-sync group) from the one it placed, whatever its weights' version says.
        self.incarnation = uuid.uuid4().hex
        self.pool = GamePool.from_config(replace(pool, seed=pool.seed + actor_id))
        self.engine = VLLMEngine(model, config, seed=config.seed + actor_id)
        self.buffer = buffer
        self.rounds = 0
        self.streams = 0
        self._prompt_texts: dict[str, str] = {}  # game prompt -> templated chat prompt (a few distinct per game)
        self._params = self.engine.sampling_params(
            config.group_size, config.temperature, config.top_p, config.max_new_tokens
        )
        # Threads of a stream share the pool (sampling vs scoring and advancing episodes) and the stats.
        self._pool_lock = threading.Lock()
        # Held while weights change: no request is submitted between a pause and its resume, so every request's
        # first version (and the engine's prompt salt) is that of the weights it starts on.
        self._weights_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._tally = _Tally(start=time.perf_counter())  # the stream's since the last drain_stats
        self._engine_busy_since: float | None = None  # the stream's engine has had requests in flight since then
        self._in_engine = 0  # the stream's requests in the engine
        self._random_steps_seen = self.pool.random_steps  # the pool's count at the last drain_stats

    # ---- weights ----------------------------------------------------------------------------------------------------
    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> bool:
        """Loads new weights (caches reset) and records their version; a push older than the current is skipped.
        Requests in flight (a stream) pause and go on with the new weights.

        Returns:
            True when loaded, False when skipped as stale.
        """
        if version < self.engine.policy_version:
            logger.warning("%s: skipped weights v%d, older than v%d", self.name, version, self.engine.policy_version)
            return False
        with self._paused():
            self.engine.load_weights(weights)
            self.engine.policy_version = version
        return True

    def join_weight_sync(self, info: Any, rank_offset: int) -> None:
        """Joins the learner's weight-sync group (see learner.LearnerGroup.init_weight_sync)."""
        self.engine.join_weight_sync(info, rank_offset)

    def receive_weights(self, plan: Any) -> float:
        """Takes one weight broadcast from the learner (requests in flight paused meanwhile); returns load seconds."""
        with self._paused():
            return self.engine.receive_weights(plan)

    def get_policy_version(self) -> int:
        """The version of the weights in the engine (what the next requests start on)."""
        return self.engine.policy_version

    def get_incarnation(self) -> str:
        """An id of this actor process, new after every restart."""
        return self.incarnation

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """The engine paused (requests in flight frozen, vLLM's "keep") and no submissions, until the block ends."""
        with self._weights_lock:
            self.engine.pause("keep")
            try:
                yield
            finally:
                self.engine.resume()

    # ---- one round --------------------------------------------------------------------------------------------------
    def run_round(self, num_states: int | None = None) -> RoundResult:
        """Samples states, generates G responses per state in one batch, scores them and publishes the groups.

        Args:
            num_states: states of this round (the driver asks for what a batch still needs); None: states_per_round.

        Returns:
            RoundResult: the stats, and the groups when the actor has no buffer.

        Raises:
            RuntimeError: when every state of the round failed (a broken game config, not a one-off error).
        """
        version = self.engine.policy_version
        cfg = self.config
        tally = _Tally(start=time.perf_counter())
        random_steps = self.pool.random_steps
        prepared, tally.num_skipped = self._prepare(cfg.states_per_round if num_states is None else num_states)
        if not prepared:
            raise RuntimeError(f"{self.name}: every state of round {self.rounds} failed; see the logged errors")
        generating = time.perf_counter()
        tally.env_s += generating - tally.start

        outputs = self.engine.generate([p.engine_input for p in prepared], self._params)
        version_after = self.engine.policy_version  # differs only if weights came in mid-round (sync mode: never)
        scoring = time.perf_counter()
        tally.generation_s = scoring - generating

        groups, tally.env_steps = [], self.pool.random_steps - random_steps
        for index, (item, output) in enumerate(zip(prepared, outputs, strict=True)):
            group = self._score(item, output, (version, version_after), f"{self.name}-{self.rounds}-{index}")
            if group is None:
                tally.num_skipped += 1
                continue
            groups.append(group)
            tally.add(group)
            tally.env_steps += group.group_size + self._advance(item.state, group.response_texts[0])
        tally.num_submitted = len(prepared)
        pushing = time.perf_counter()
        tally.env_s += pushing - scoring

        tally.num_accepted = self._push(groups) if self.buffer is not None else len(groups)
        end = time.perf_counter()
        tally.push_s = end - pushing
        self.rounds += 1
        return RoundResult(tally.stats(version, self.incarnation, end), [] if self.buffer is not None else groups)

    def _prepare(self, n: int) -> tuple[list[_Prepared], int]:
        """n states with their prompts, one at a time so that a game raising costs only its own state.

        Returns:
            The prepared states and how many failed.
        """
        prepared, failed = [], 0
        for _ in range(n):
            item = self._prepare_one()
            if item is None:
                failed += 1
            else:
                prepared.append(item)
        return prepared, failed

    def _prepare_one(self) -> _Prepared | None:
        """The pool's next state, rendered and prompted; None (logged) when its game raised."""
        try:
            with self._pool_lock:
                (state,) = self.pool.sample(1)
        except Exception:
            logger.exception("%s: preparing a state failed; skipping it", self.name)
            return None
        text = self._chat_prompt(state.prompt)
        return _Prepared(state, text, engine_input(text, state.image))

    def _chat_prompt(self, instructions: str) -> str:
        text = self._prompt_texts.get(instructions)
        if text is None:
            text = self._prompt_texts[instructions] = chat_prompt(self.engine.tokenizer, instructions)
        return text

    def _score(self, item: _Prepared, output: Any, versions: tuple[int, int], state_id: str) -> TrajectoryGroup | None:
        """The state's trajectory group (each response scored on its own clone), or None when its game raised.

        Args:
            versions: the policy versions (first, last) the responses were generated under.
        """
        state, completions = item.state, output.outputs
        texts = self.engine.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        try:
            rewards = self.pool.score(state, texts)  # clones of the state: no pool lock needed
        except Exception:
            logger.exception("%s: scoring state %s failed; skipping it", self.name, state.state_id)
            return None
        return TrajectoryGroup(
            game=state.game_name,
            state_id=state_id,
            image=state.image,
            prompt_text=item.prompt_text,
            prompt_ids=list(output.prompt_token_ids),
            response_ids=[list(c.token_ids) for c in completions],
            response_logprobs=[list(c.logprobs.logprobs) for c in completions],
            response_texts=texts,
            rewards=rewards,
            policy_version=versions[0],
            text_observation=state.text_observation,
            finished=[c.finish_reason == "stop" for c in completions],
            response_versions=[versions] * len(completions),
        )

    def _advance(self, state: PooledState, response: str) -> int:
        """Mode "continue": moves the state's episode on with the group's first sample (a draw from the policy).

        Returns the game steps taken (0 in mode "reset" or when the game raised).
        """
        if self.pool.mode != "continue":
            return 0
        try:
            with self._pool_lock:
                self.pool.advance(state, response)
        except Exception:
            logger.exception("%s: advancing state %s failed; its episode does not move", self.name, state.state_id)
            return 0
        return 1

    def _push(self, groups: list[TrajectoryGroup]) -> int:
        """Puts each group into the object store once and all their BufferItems into the buffer in one call; blocks
        while it is full.

        Returns:
            How many groups the buffer stored (the others it dropped and counted, e.g. as stale).
        """
        import ray

        from replay.buffer import BufferItem

        if not groups:
            return 0
        return ray.get(self.buffer.put_many.remote([BufferItem.from_group(group, self.name) for group in groups]))

    # ---- continuous generation --------------------------------------------------------------------------------------
    def stream(self, max_states_in_flight: int | None = None) -> StreamSummary:
        """Generates continuously into the buffer until `stop_stream` (or the buffer is closed or dead).

        Up to `max_states_in_flight` states are in the engine at any time, and twice that many submitted and not yet
        pushed; a slot freed by a finished request is refilled at once from the states a preparer thread keeps
        ready, unless the groups waiting for the buffer have reached that bound. On `stop_stream` the requests in flight
        finish and their groups are pushed before this returns; when the buffer is closed or dead they are aborted.

        Args:
            max_states_in_flight: slots; None takes `actors.states_per_round`.

        Returns:
            StreamSummary: how it ended and what became of every state it submitted.

        Raises:
            ValueError: without a buffer, or when max_states_in_flight < 1.
        """
        slots = self.config.states_per_round if max_states_in_flight is None else max_states_in_flight
        if self.buffer is None:
            raise ValueError(f"{self.name}: stream needs a buffer (RolloutActor(buffer=...))")
        if slots < 1:
            raise ValueError(f"stream: max_states_in_flight must be >= 1; got {slots}")
        self._stop.clear()
        with self._pool_lock:  # the steps of rounds before this stream were counted by their rounds
            self._random_steps_seen = self.pool.random_steps
        run = _StreamRun(self, slots)
        self.streams += 1
        run.go()
        return run.summary()

    def stop_stream(self) -> None:
        """Asks a running `stream` to end: no new requests; those in flight finish and are pushed first."""
        self._stop.set()

    def drain_stats(self) -> RoundStats | None:
        """The stats of everything streamed since the last call (None when no state finished since)."""
        with self._stats_lock:
            tally = self._tally
            if tally.num_groups + tally.num_skipped == 0:
                return None
            now = time.perf_counter()
            self._count_busy(now)
            self._tally = _Tally(start=now)
        with self._pool_lock:  # the random steps after resets, taken by the preparer
            random_steps = self.pool.random_steps
        tally.env_steps += random_steps - self._random_steps_seen
        self._random_steps_seen = random_steps
        return tally.stats(self.engine.policy_version, self.incarnation, now)

    def _count_busy(self, now: float) -> None:
        """Adds the engine's busy time up to `now` to the tally (under _stats_lock)."""
        if self._engine_busy_since is not None:
            self._tally.generation_s += now - self._engine_busy_since
            self._engine_busy_since = now

    def _entered_engine(self) -> None:
        with self._stats_lock:
            if self._in_engine == 0:
                self._engine_busy_since = time.perf_counter()
            self._in_engine += 1
            self._tally.num_submitted += 1

    def _left_engine(self) -> None:
        with self._stats_lock:
            self._in_engine -= 1
            if self._in_engine == 0:
                self._count_busy(time.perf_counter())
                self._engine_busy_since = None


class _StreamRun:
    """One `RolloutActor.stream` call: its preparer and pusher threads, its queues and its counts.

    An engine slot is taken before a state is submitted and given back when its request ends; a backlog slot (twice
    as many) is taken with it and given back once its group was pushed (or it was skipped or aborted). The engine
    is refilled while earlier groups are scored and pushed, and a buffer that takes nothing stops submissions.
    """

    def __init__(self, actor: RolloutActor, slots: int) -> None:
        self.actor = actor
        self.engine_slots = threading.Semaphore(slots)
        self.backlog = threading.Semaphore(2 * slots)
        self.ready: queue.Queue[_Prepared] = queue.Queue(maxsize=slots)  # states prepared ahead
        self.finished: queue.Queue[tuple[_Prepared, int, int, Future]] = queue.Queue()  # (item, first, last, output)
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
            threading.Thread(target=self._prepare_loop, name=f"{self.actor.name}-prepare", daemon=True),
            threading.Thread(target=self._push_loop, name=f"{self.actor.name}-push", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            self._submit_loop()
        finally:
            self.actor._stop.set()  # ends the preparer (also when a submission raised)
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
        self.actor._stop.set()

    # ---- this thread: submissions -------------------------------------------------------------------------------
    def _submit_loop(self) -> None:
        actor = self.actor
        while self._acquire(self.backlog):
            if not self._acquire(self.engine_slots):
                break
            item = self._next_ready()
            if item is None:
                break
            with actor._weights_lock:
                first = actor.engine.policy_version
                future = actor.engine.submit(item.engine_input, actor._params)
            actor._entered_engine()
            with self.lock:
                self.counts["submitted"] += 1
                self.in_flight.add(future)
            future.add_done_callback(lambda done, item=item, first=first: self._on_done(item, first, done))
        if self.buffer_gone.is_set() or self.error is not None:
            with self.lock:
                in_flight = list(self.in_flight)
            for future in in_flight:
                future.cancel()  # aborts the request in the engine

    def _acquire(self, slots: threading.Semaphore) -> bool:
        """Takes a slot; False when the stream is stopping instead."""
        while not self.actor._stop.is_set():
            if slots.acquire(timeout=POLL_S):
                return True
        return False

    def _next_ready(self) -> _Prepared | None:
        while not self.actor._stop.is_set():
            try:
                return self.ready.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    def _on_done(self, item: _Prepared, first: int, future: Future) -> None:
        """On the engine's loop thread: the request ended (its last version is the engine's now)."""
        self.actor._left_engine()
        self.engine_slots.release()
        with self.lock:
            self.in_flight.discard(future)
        self.finished.put((item, first, self.actor.engine.policy_version, future))

    # ---- preparer thread ------------------------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        actor, stop, failures = self.actor, self.actor._stop, 0
        while not stop.is_set():
            begin = time.perf_counter()
            item = actor._prepare_one()
            with actor._stats_lock:
                actor._tally.env_s += time.perf_counter() - begin
                actor._tally.num_skipped += item is None
            if item is None:
                self.counts["unprepared"] += 1
                failures += 1
                if failures >= PREPARE_FAILURES_IN_A_ROW:
                    self._fail(RuntimeError(f"{actor.name}: {failures} states in a row failed; see the logged errors"))
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

    def _take_batch(self) -> list[tuple[_Prepared, int, int, Future]] | None:
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

    def _push_batch(self, batch: list[tuple[_Prepared, int, int, Future]]) -> None:
        import ray

        actor, groups = self.actor, []
        scoring = time.perf_counter()
        for item, first, last, future in batch:
            if future.cancelled() or self.buffer_gone.is_set():
                self.counts["aborted"] += 1
                continue
            output = future.result()  # an engine error ends the stream (raised from `stream`)
            with self.lock:
                serial = self.counts["groups"] + self.counts["skipped"]
            group = actor._score(item, output, (first, last), f"{actor.name}-s{actor.streams}-{serial}")
            if group is None:
                self.counts["skipped"] += 1
                with actor._stats_lock:
                    actor._tally.num_skipped += 1
                continue
            steps = group.group_size + actor._advance(item.state, group.response_texts[0])
            self.counts["groups"] += 1
            groups.append(group)
            with actor._stats_lock:
                actor._tally.add(group)
                actor._tally.env_steps += steps
        pushing = time.perf_counter()
        accepted = 0
        try:
            accepted = actor._push(groups)
        except ray.exceptions.RayActorError:
            logger.warning("%s: the buffer is dead; the stream ends", actor.name)
            self._buffer_ended("buffer_dead")
            self.counts["unpushed"] += len(groups)
        else:
            self.counts["pushed"] += len(groups)
            self.counts["accepted"] += accepted
            if accepted < len(groups) and ray.get(actor.buffer.stats.remote()).drops["closed"] > 0:
                self._buffer_ended("buffer_closed")
        with actor._stats_lock:
            actor._tally.env_s += pushing - scoring
            actor._tally.push_s += time.perf_counter() - pushing
            actor._tally.num_accepted += accepted

    def _buffer_ended(self, reason: str) -> None:
        self.ended_by = reason
        self.buffer_gone.set()
        self.actor._stop.set()
