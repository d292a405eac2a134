"""The rollout actor: a game pool and its own vLLM engine, turning game states into scored trajectory groups.

One round (`run_round`):
    pool.sample (reset + K random steps, or continued episodes; rendered)  -> chat prompts with the board image
    -> ONE engine.generate of states x G samples (temperature, top-p, max tokens from RolloutConfig)
    -> every response scored on its own clone of its state (pool.score -> envs.score)
    -> one TrajectoryGroup per state, stamped with the policy version -> ray.put + buffer.put (or returned)

A plain class: launch/train.py applies `ray.remote(num_cpus=..., num_gpus=...)` and tests build it directly or
remotely. An error in one game (sampling or scoring a state) is logged and that state skipped; the actor keeps going.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from actors.config import RolloutConfig
from actors.models import ModelSource
from actors.prompts import chat_prompt, engine_input
from actors.vllm_engine import VLLMEngine
from envs import GamePool, PoolConfig, PooledState
from replay.buffer import REWARD_PARTS
from replay.trajectory import TrajectoryGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundStats:
    """What one round did and how fast (one actor). `to_metrics` gives the TensorBoard tags of design.md."""

    policy_version: int  # weights that generated the round
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

    @property
    def outside_generation_share(self) -> float:
        """Share of the round's wall time not spent in engine.generate (the actor's overhead)."""
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


def _reward_means(groups: Iterable[TrajectoryGroup]) -> dict[str, float]:
    rewards = [r for g in groups for r in g.rewards]
    return {part: float(np.mean([getattr(r, part) for r in rewards])) if rewards else 0.0 for part in REWARD_PARTS}


class RolloutActor:
    """A game pool and a vLLM engine that produce trajectory groups.

    Args:
        config: engine and sampling settings.
        pool: the game mix; actor i plays it with seed `pool.seed + i`.
        model: the resolved model (actors.models.resolve_model) or a local model directory.
        actor_id: index of this actor; names it (`rollout-<i>`) and offsets its seeds.
        buffer: a handle to the replay buffer actor (`replay.ReplayBuffer` under ray.remote); None returns the groups
            from `run_round` instead.
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
        self._prompt_texts: dict[str, str] = {}  # game prompt -> templated chat prompt (a few distinct per game)
        self._params = self.engine.sampling_params(
            config.group_size, config.temperature, config.top_p, config.max_new_tokens
        )

    # ---- weights ----------------------------------------------------------------------------------------------------
    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> bool:
        """Loads new weights (caches reset) and records their version; a push older than the current is skipped.

        Returns:
            True when loaded, False when skipped as stale.
        """
        if version < self.engine.policy_version:
            logger.warning("%s: skipped weights v%d, older than v%d", self.name, version, self.engine.policy_version)
            return False
        self.engine.load_weights(weights)
        self.engine.policy_version = version
        return True

    def join_weight_sync(self, info: Any, rank_offset: int) -> None:
        """Joins the learner's weight-sync group (see learner.LearnerGroup.init_weight_sync)."""
        self.engine.join_weight_sync(info, rank_offset)

    def receive_weights(self, plan: Any) -> float:
        """Takes one weight broadcast from the learner; returns the load seconds."""
        return self.engine.receive_weights(plan)

    def get_policy_version(self) -> int:
        """The version of the weights in the engine (what the next round's groups will be stamped with)."""
        return self.engine.policy_version

    def get_incarnation(self) -> str:
        """An id of this actor process, new after every restart."""
        return self.incarnation

    # ---- one round --------------------------------------------------------------------------------------------------
    def run_round(self, num_states: int | None = None) -> RoundResult:
        """Samples states, generates G responses per state in one call, scores them and publishes the groups.

        Args:
            num_states: states of this round (the driver asks for what a batch still needs); None: states_per_round.

        Returns:
            RoundResult: the stats, and the groups when the actor has no buffer.

        Raises:
            RuntimeError: when every state of the round failed (a broken game config, not a one-off error).
        """
        version = self.engine.policy_version
        cfg = self.config
        start = time.perf_counter()
        random_steps = self.pool.random_steps
        states, skipped = self._sample_states(cfg.states_per_round if num_states is None else num_states)
        if not states:
            raise RuntimeError(f"{self.name}: every state of round {self.rounds} failed; see the logged errors")
        prompt_texts = [self._chat_prompt(s.prompt) for s in states]
        inputs = [engine_input(text, s.image) for text, s in zip(prompt_texts, states, strict=True)]
        prepared = time.perf_counter()

        outputs = self.engine.generate(inputs, self._params)
        generated = time.perf_counter()

        groups, env_steps = [], self.pool.random_steps - random_steps
        for index, (state, text, output) in enumerate(zip(states, prompt_texts, outputs, strict=True)):
            group = self._score(state, text, output, version, index)
            if group is None:
                skipped += 1
                continue
            groups.append(group)
            env_steps += group.group_size + self._advance(state, group.response_texts[0])
        scored = time.perf_counter()

        accepted = self._push(groups) if self.buffer is not None else len(groups)
        end = time.perf_counter()
        self.rounds += 1
        stats = self._stats(groups, skipped, accepted, version, env_steps, (start, prepared, generated, scored, end))
        return RoundResult(stats, [] if self.buffer is not None else groups)

    def _sample_states(self, n: int) -> tuple[list[PooledState], int]:
        """n states, one at a time so that a game raising costs only its own state."""
        states, skipped = [], 0
        for _ in range(n):
            try:
                states.extend(self.pool.sample(1))
            except Exception:
                logger.exception("%s: preparing a state failed; skipping it", self.name)
                skipped += 1
        return states, skipped

    def _chat_prompt(self, instructions: str) -> str:
        text = self._prompt_texts.get(instructions)
        if text is None:
            text = self._prompt_texts[instructions] = chat_prompt(self.engine.tokenizer, instructions)
        return text

    def _score(
        self, state: PooledState, prompt_text: str, output: Any, version: int, index: int
    ) -> TrajectoryGroup | None:
        """The state's trajectory group (each response scored on its own clone), or None when its game raised."""
        completions = output.outputs
        texts = self.engine.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        try:
            rewards = self.pool.score(state, texts)
        except Exception:
            logger.exception("%s: scoring state %s failed; skipping it", self.name, state.state_id)
            return None
        return TrajectoryGroup(
            game=state.game_name,
            state_id=f"{self.name}-{self.rounds}-{index}",
            image=state.image,
            prompt_text=prompt_text,
            prompt_ids=list(output.prompt_token_ids),
            response_ids=[list(c.token_ids) for c in completions],
            response_logprobs=[list(c.logprobs.logprobs) for c in completions],
            response_texts=texts,
            rewards=rewards,
            policy_version=version,
            text_observation=state.text_observation,
            finished=[c.finish_reason == "stop" for c in completions],
        )

    def _advance(self, state: PooledState, response: str) -> int:
        """Mode "continue": moves the state's episode on with the group's first sample (a draw from the policy).

        Returns the game steps taken (0 in mode "reset" or when the game raised).
        """
        if self.pool.mode != "continue":
            return 0
        try:
            self.pool.advance(state, response)
        except Exception:
            logger.exception("%s: advancing state %s failed; its episode does not move", self.name, state.state_id)
            return 0
        return 1

    def _push(self, groups: list[TrajectoryGroup]) -> int:
        """Puts each group into the object store once and its BufferItem into the buffer; blocks while it is full.

        Returns:
            How many groups the buffer stored (the others it dropped and counted, e.g. as stale).
        """
        import ray

        from replay.buffer import BufferItem

        items = [BufferItem.from_group(group, self.name) for group in groups]
        return sum(ray.get([self.buffer.put.remote(item) for item in items]))

    def _stats(
        self,
        groups: list[TrajectoryGroup],
        skipped: int,
        accepted: int,
        version: int,
        env_steps: int,
        times: tuple[float, float, float, float, float],
    ) -> RoundStats:
        """The round's RoundStats; `times` = perf_counter at start, prepared, generated, scored and end."""
        start, prepared, generated, scored, end = times
        completions = [(ids, ok) for g in groups for ids, ok in zip(g.response_ids, g.finished, strict=True)]
        rewards = [r for g in groups for r in g.rewards]
        tokens = sum(len(ids) for ids, _ in completions)
        generation_s = generated - prepared
        env_s = (prepared - start) + (scored - generated)
        by_game: dict[str, list[TrajectoryGroup]] = defaultdict(list)
        for group in groups:
            by_game[group.game].append(group)
        return RoundStats(
            policy_version=version,
            incarnation=self.incarnation,
            num_groups=len(groups),
            num_skipped=skipped,
            num_responses=len(completions),
            num_accepted=accepted,
            tokens_generated=tokens,
            generation_s=generation_s,
            env_s=env_s,
            push_s=end - scored,
            round_s=end - start,
            tokens_per_s=tokens / generation_s if generation_s > 0 else 0.0,
            env_steps=env_steps,
            env_steps_per_s=env_steps / env_s if env_s > 0 else 0.0,
            invalid_action_rate=float(np.mean([not r.valid_action for r in rewards])) if rewards else 0.0,
            truncated_rate=float(np.mean([not ok for _, ok in completions])) if completions else 0.0,
            reward_mean=_reward_means(groups),
            reward_mean_by_game={game: _reward_means(gs) for game, gs in sorted(by_game.items())},
        )
