"""A pool of games that prepares batches of states for rollouts and scores G responses per state.

The pool holds `num_games` slots, split among the games of the mix in proportion to their weights (and interleaved,
so that any run of consecutive slots mixes the games). `sample(n)` takes the next n slots round-robin:

- mode "reset" (the paper's): each state is a fresh game (seeded from the pool's rng), reset, then K random legal
  steps (K per game), starting over when an episode ends on the way;
- mode "continue": each slot keeps one game playing; a state is a snapshot of it, and `advance` moves it on with the
  chosen response (a random legal action when the response has none), resetting finished episodes.

Each state carries a snapshot of its game that the pool never touches again, so responses are scored (each on its
own clone, by `envs.score`) and rendered without locks, in any order, in any process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import envs
from envs.base import Game, Reward, StepResult
from envs.config import GameSpec, PoolConfig
from envs.rewards import score


@dataclass(frozen=True)
class PooledState:
    """One state handed out by the pool."""

    state_id: str  # "<game>-<slot>-<serial>", unique within the pool
    game_name: str
    game: Game  # a snapshot the pool will not mutate
    image: np.ndarray  # (H, W, 3) uint8, the frame the model sees
    text_observation: str  # ground-truth board text (the perception target)
    prompt: str


def _split(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder split of `total` slots in proportion to `weights`."""
    quotas = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(quotas).astype(int)
    for i in np.argsort(-(quotas - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


class GamePool:
    """N games, one game or a weighted mix, that prepare batches of states and score responses.

    Args:
        games: the mix; weights split the slots.
        num_games: number of slots.
        seed: seeds the pool's rng, from which every game's seed is drawn.
        mode: "reset" or "continue" (see the module docstring).

    Raises:
        ValueError: an unknown game or knob (naming the key and what is allowed), a bad mode, or a mix with more
            games than slots.
    """

    def __init__(self, games: Sequence[GameSpec], num_games: int, seed: int = 0, mode: str = "reset") -> None:
        config = PoolConfig(games=tuple(games), num_games=num_games, seed=seed, mode=mode)  # validates
        self.specs, self.num_games, self.mode = config.games, num_games, mode
        self.rng = np.random.default_rng(seed)
        counts = _split([spec.weight for spec in self.specs], num_games)
        starved = [spec.name for spec, count in zip(self.specs, counts, strict=True) if count == 0]
        if starved:
            raise ValueError(f"pool: num_games={num_games} leaves no slot for {starved}; raise num_games or weights")
        # Interleave: slot order by each game's evenly spaced positions in [0, 1).
        keyed = [((k + 0.5) / count, i) for i, count in enumerate(counts) for k in range(count)]
        self.slot_specs: list[GameSpec] = [self.specs[i] for _, i in sorted(keyed)]
        for spec in self.specs:
            envs.make(spec.name, seed=0, **spec.difficulty)  # fail now on an unknown game or a bad knob
        self._games: list[Game | None] = [None] * num_games  # mode "continue": the game each slot plays
        self._current: dict[int, str] = {}  # mode "continue": the id of each slot's latest snapshot
        self._cursor = 0
        self._serial = 0
        self.random_steps = 0  # random legal steps taken after resets so far (the rollout's env-step count)

    @classmethod
    def from_config(cls, config: PoolConfig) -> GamePool:
        return cls(config.games, config.num_games, config.seed, config.mode)

    def _new_game(self, spec: GameSpec) -> Game:
        """A fresh game after K random legal steps (starting over when an episode ends on the way)."""
        game = envs.make(spec.name, seed=int(self.rng.integers(2**31)), **spec.difficulty)
        for _ in range(spec.steps_after_reset):
            game.step(game.random_legal_action(self.rng))
            self.random_steps += 1
            if game.terminated:
                game = envs.make(spec.name, seed=int(self.rng.integers(2**31)), **spec.difficulty)
        return game

    def _state(self, slot: int, game: Game) -> PooledState:
        self._serial += 1
        state_id = f"{game.name}-{slot}-{self._serial}"
        return PooledState(state_id, game.name, game, game.render_array(), game.text_observation(), game.prompt)

    def sample(self, n: int) -> list[PooledState]:
        """The next n states, from the next n slots round-robin.

        In mode "continue", n may not exceed num_games (two states of one slot could not both be advanced).
        """
        if self.mode == "continue" and n > self.num_games:
            raise ValueError(f"pool: mode 'continue' samples at most num_games={self.num_games} states; got {n}")
        states = []
        for _ in range(n):
            slot = self._cursor
            self._cursor = (self._cursor + 1) % self.num_games
            spec = self.slot_specs[slot]
            if self.mode == "reset":
                states.append(self._state(slot, self._new_game(spec)))
                continue
            game = self._games[slot]
            if game is None or game.terminated:
                game = self._games[slot] = self._new_game(spec)
            state = self._state(slot, game.clone())
            self._current[slot] = state.state_id
            states.append(state)
        return states

    def advance(self, state: PooledState, action_text: str) -> StepResult:
        """Mode "continue": moves the state's game on with the response's action (random legal if it has none).

        Raises:
            ValueError: in mode "reset", or when the state is not its slot's latest snapshot.
        """
        if self.mode != "continue":
            raise ValueError("pool: advance needs mode 'continue'")
        slot = int(state.state_id.rsplit("-", 2)[1])
        game = self._games[slot]
        if self._current.get(slot) != state.state_id or game is None:
            raise ValueError(f"pool: state {state.state_id!r} is not the latest snapshot of its game")
        action = game.parse_action(action_text)
        if action not in game.legal_actions():
            action = game.random_legal_action(self.rng)
        result = game.step(action)
        if game.terminated:
            self._games[slot] = self._new_game(self.slot_specs[slot])
        del self._current[slot]
        return result

    def score(self, state: PooledState, responses: Sequence[str]) -> list[Reward]:
        """Each response's reward, each from its own clone of the state, with its game's RewardConfig."""
        slot = int(state.state_id.rsplit("-", 2)[1])
        config = self.slot_specs[slot].reward
        return [score(state.game, response, config) for response in responses]
