"""The rollout actor: a game pool and its own vLLM engine, turning game states into scored trajectory groups.

Two ways to run it (sync and async training, launch/rollouts.py):

One round (`run_round`, sync mode: exactly on-policy):
    pool.sample (reset + K random steps, or continued episodes; rendered)  -> chat prompts with the board image
    -> states x G samples submitted to the engine at once (temperature, top-p, max tokens from RolloutConfig)
    -> every response scored on its own clone of its state (pool.score -> envs.score)
    -> one TrajectoryGroup per state, stamped with the policy version -> ray.put + buffer.put (or returned)

A stream (`stream`, async mode), until `stop_stream`: the same steps, continuously, in threads that overlap game
stepping, decoding and pushing (actors/stream.py); ONE buffer.put_many per batch of finished groups, and a full buffer
stalls generation.

Weights arrive while generating (`receive_weights`, `load_weights`): the engine pauses its requests in flight (vLLM's
"keep"), loads, labels the new weights with their version, and resumes the requests on them. vLLM labels every
sampled token with the weights' version, so each response records the versions of its first and last tokens
(`TrajectoryGroup.response_versions`) and its group the oldest, whenever its output is read.

A plain class: launch/cluster.py applies `ray.remote` (with max_concurrency, so `stop_stream`, `drain_stats` and weight
updates run while `stream` does) and tests build it directly or remotely. An error in one game (sampling or scoring a
state) is logged and that state skipped; the actor keeps going.
"""

from __future__ import annotations

import ctypes
import logging
import os
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
from actors.stream import EngineClock, StreamRun, StreamSource, StreamSummary
from actors.vllm_engine import VLLMEngine
from envs import GamePool, PoolConfig, PooledState
from replay.buffer import REWARD_PARTS
from replay.trajectory import TrajectoryGroup

logger = logging.getLogger(__name__)


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

    def take(self, now: float) -> _Tally:
        """The sums so far; this tally starts again at `now`. A stream's tally stays the same object, so a thread
        may hold it across a `drain_stats`."""
        taken = replace(self)  # shares the dicts, which the reset below replaces
        vars(self).update(vars(_Tally(start=now)))
        return taken

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


def _sampled_by(completion: Any) -> tuple[int, int]:
    """(first, last): the policy versions that sampled a completion's first and last tokens.

    vLLM's engine core labels each step's tokens with the weights' version (`VLLMEngine.set_policy_version`, set
    while paused), so this is exact however late the output is read: a response that finished just before a pause
    keeps the old version, and one submitted before it but scheduled after starts on the new.
    """
    spans = completion.weight_versions
    return int(spans[0].version), int(spans[-1].version)


@dataclass
class _Prepared:
    """A state ready for the engine."""

    state: PooledState
    prompt_text: str
    engine_input: dict[str, Any]  # a vLLM prompt dict; in a stream already rendered (VLLMEngine.render)


class RolloutActor:
    """A game pool and a vLLM engine that produce trajectory groups.

    Args:
        config: engine and sampling settings.
        pool: the game mix; actor i plays it with seed `pool.seed + i`.
        model: the resolved model (actors.models.resolve_model) or a local model directory.
        actor_id: index of this actor; names it (`rollout-<i>`) and offsets its seeds.
        buffer: the replay buffer actor (`replay.ReplayBuffer` under ray.remote): a handle, or its name in the job's
            namespace (looked up here; launch/cluster.py passes the name); None returns the groups from `run_round`
            instead (`stream` needs a buffer).
    """

    def __init__(
        self,
        config: RolloutConfig,
        pool: PoolConfig,
        model: ModelSource | str | os.PathLike,
        actor_id: int = 0,
        buffer: Any | str | None = None,
    ) -> None:
        _retain_freed_memory()
        self.config = config
        self.name = f"rollout-{actor_id}"
        # Changes when Ray restarts this actor: the driver tells a restarted actor (initial weights, not in the
        # weight-sync group) from the one it placed, whatever its weights' version says.
        self.incarnation = uuid.uuid4().hex
        self.pool = GamePool.from_config(replace(pool, seed=pool.seed + actor_id))
        self.engine = VLLMEngine(model, config, seed=config.seed + actor_id)
        if isinstance(buffer, str):
            import ray

            buffer = ray.get_actor(buffer)
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
        # prompt salt is that of the weights it starts on.
        self._weights_lock = threading.Lock()
        self._stats_lock = threading.Lock()  # guards every tally update and the engine clock
        # Set by stop_stream and cleared when a stream ends: a stop sent before its stream started is not lost.
        self._stop = threading.Event()
        self._tally = _Tally(start=time.perf_counter())  # the stream's since the last drain_stats
        self._clock = EngineClock()  # the stream's engine-busy time
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
            self.engine.set_policy_version(version)
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
        scoring = time.perf_counter()
        tally.generation_s = scoring - generating

        tally.env_steps = self.pool.random_steps - random_steps
        scored = (
            self._score_into(tally, item, output, f"{self.name}-{self.rounds}-{index}")
            for index, (item, output) in enumerate(zip(prepared, outputs, strict=True))
        )
        groups = [group for group in scored if group is not None]
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

    def _prepare_one(self, render: bool = False) -> _Prepared | None:
        """The pool's next state with its board image and prompt; None (logged) when its game or its prompt raised.

        Args:
            render: process the prompt for the engine here too (`VLLMEngine.render`): a stream's preparer thread
                does, so that this overlaps decoding instead of delaying the request when a slot frees up. A round
                leaves it to the engine, which processes each prompt as it is submitted while the round's first
                requests already run.
        """
        try:
            with self._pool_lock:
                (state,) = self.pool.sample(1)
            text = self._chat_prompt(state.prompt)
            prompt = engine_input(text, state.image)
            return _Prepared(state, text, self.engine.render(prompt) if render else prompt)
        except Exception:
            logger.exception("%s: preparing a state failed; skipping it", self.name)
            return None

    def _chat_prompt(self, instructions: str) -> str:
        text = self._prompt_texts.get(instructions)
        if text is None:
            text = self._prompt_texts[instructions] = chat_prompt(self.engine.tokenizer, instructions)
        return text

    def _score_into(self, tally: _Tally, item: _Prepared, output: Any, state_id: str) -> TrajectoryGroup | None:
        """Scores a finished request (a round's or a stream's) into its trajectory group and counts it in `tally`:
        the group, its responses' game steps and a continued episode's move; or a skip when its game raised.

        Returns:
            The group, or None when skipped.
        """
        group = self._score(item, output, state_id)
        steps = 0 if group is None else group.group_size + self._advance(item.state, group.response_texts[0])
        with self._stats_lock:  # a stream's tally is read by drain_stats meanwhile
            if group is None:
                tally.num_skipped += 1
            else:
                tally.add(group)
                tally.env_steps += steps
        return group

    def _score(self, item: _Prepared, output: Any, state_id: str) -> TrajectoryGroup | None:
        """The state's trajectory group (each response scored on its own clone), or None when its game raised."""
        state, completions = item.state, output.outputs
        texts = self.engine.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        try:
            rewards = self.pool.score(state, texts)  # clones of the state: no pool lock needed
        except Exception:
            logger.exception("%s: scoring state %s failed; skipping it", self.name, state.state_id)
            return None
        versions = [_sampled_by(c) for c in completions]
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
            policy_version=min(first for first, _ in versions),
            text_observation=state.text_observation,
            finished=[c.finish_reason == "stop" for c in completions],
            response_versions=versions,
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

        Up to `max_states_in_flight` states are submitted and not yet pushed at any time (so `stream_slots` bounds
        their staleness); a slot is refilled from the states a preparer thread keeps ready as soon as its group was
        scored and pushed, which a full buffer delays. On `stop_stream` the requests in flight
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
        with self._pool_lock:  # the steps of rounds before this stream were counted by their rounds
            self._random_steps_seen = self.pool.random_steps
        self.streams += 1
        source = StreamSource(
            name=self.name,
            state_ids=f"{self.name}-s{self.streams}",
            stop=self._stop,
            prepare=self._prepare_streamed,
            submit=self._submit_streamed,
            request_ended=self._request_ended,
            score=self._score_streamed,
            push=self._push_streamed,
            buffer_closed=self._buffer_closed,
        )
        run = StreamRun(source, slots)
        try:
            run.go()
        finally:
            self._stop.clear()  # the stop this stream ended on (or one sent before it started) is used up
        return run.summary()

    # What a stream uses (its StreamSource): each keeps the stream's stats, which drain_stats reads meanwhile.
    def _prepare_streamed(self) -> _Prepared | None:
        begin = time.perf_counter()
        item = self._prepare_one(render=True)
        with self._stats_lock:
            self._tally.env_s += time.perf_counter() - begin
            self._tally.num_skipped += item is None
        return item

    def _submit_streamed(self, item: _Prepared) -> Future:
        with self._weights_lock:  # not between a pause and its resume
            future = self.engine.submit(item.engine_input, self._params)
        with self._stats_lock:
            self._clock.enter(time.perf_counter())
            self._tally.num_submitted += 1
        return future

    def _request_ended(self) -> None:
        with self._stats_lock:
            self._tally.generation_s += self._clock.leave(time.perf_counter())

    def _score_streamed(self, item: _Prepared, output: Any, state_id: str) -> TrajectoryGroup | None:
        begin = time.perf_counter()
        group = self._score_into(self._tally, item, output, state_id)
        with self._stats_lock:
            self._tally.env_s += time.perf_counter() - begin
        return group

    def _push_streamed(self, groups: list[TrajectoryGroup]) -> int:
        begin, accepted = time.perf_counter(), 0
        try:
            accepted = self._push(groups)
        finally:
            with self._stats_lock:
                self._tally.push_s += time.perf_counter() - begin
                self._tally.num_accepted += accepted
        return accepted

    def _buffer_closed(self) -> bool:
        import ray

        return ray.get(self.buffer.stats.remote()).drops["closed"] > 0

    def stop_stream(self) -> None:
        """Asks `stream` to end: no new requests; those in flight finish and are pushed first.

        The request holds until a stream ends: a threaded actor may run this call before a `stream` sent earlier has
        started, and that stream then ends at once instead of running on unstopped.
        """
        self._stop.set()

    def shutdown(self) -> None:
        """Ends a stream, if one runs, and stops the engine (its engine-core process): the last call before the actor
        is killed (launch/rollouts.py), so that vLLM ends quietly instead of reporting its engine core's death."""
        self._stop.set()
        self.engine.shutdown()

    def requests_in_engine(self) -> int:
        """How many of a stream's requests the engine holds now: those that a weight load pauses and resumes."""
        with self._stats_lock:
            return self._clock.in_engine

    def drain_stats(self) -> RoundStats | None:
        """The stats of everything streamed since the last call (None when no state finished since)."""
        with self._stats_lock:
            if self._tally.num_groups + self._tally.num_skipped == 0:
                return None
            now = time.perf_counter()
            self._tally.generation_s += self._clock.lap(now)
            tally = self._tally.take(now)
        with self._pool_lock:  # the random steps after resets, taken by the preparer
            random_steps = self.pool.random_steps
        tally.env_steps += random_steps - self._random_steps_seen
        self._random_steps_seen = random_steps
        return tally.stats(self.engine.policy_version, self.incarnation, now)
