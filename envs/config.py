"""The game-mix schema: which games a pool plays, how often, how hard, and how responses are scored.

These dataclasses are the schema of the Hydra `game` config group; YAML files hold overrides only. `from_dict` turns
a plain or OmegaConf mapping into them and names any unknown key with the allowed ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from envs.rewards import RewardConfig

# K random legal steps after each reset, the released G1 trainer's way of diversifying states.
DEFAULT_RANDOM_STEPS = {"2048": 100, "shisen_sho": 250, "swap": 0, "tetris": 0}
POOL_MODES = ("reset", "continue")


def _plain(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict of a plain or OmegaConf mapping (OmegaConf lists become tuples later, in Game.check_difficulty)."""
    if mapping is None:
        return {}
    if hasattr(mapping, "_metadata"):  # an OmegaConf DictConfig, without importing omegaconf here
        from omegaconf import OmegaConf

        return OmegaConf.to_container(mapping, resolve=True)  # type: ignore[return-value]
    return dict(mapping)


def _check_keys(where: str, given: Mapping[str, Any], cls: type) -> None:
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")


@dataclass(frozen=True)
class GameSpec:
    """One game of a mix.

    Attributes:
        name: registry name ("tetris", "2048", "shisen_sho", "swap").
        weight: share of the pool's games (relative to the other entries' weights).
        difficulty: knob values passed to the game (see each game's `knobs`).
        random_steps: random legal steps after each reset; None = DEFAULT_RANDOM_STEPS of the game (0 if unlisted).
        reward: how responses to this game's states are scored.
    """

    name: str
    weight: float = 1.0
    difficulty: dict[str, Any] = field(default_factory=dict)
    random_steps: int | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight <= 0:
            raise ValueError(f"game {self.name!r}: key 'weight' must be a number > 0; got {self.weight!r}")
        steps = self.random_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"game {self.name!r}: key 'random_steps' must be an integer >= 0 or None; got {steps!r}")

    @property
    def steps_after_reset(self) -> int:
        """K, the random steps taken after each reset."""
        return DEFAULT_RANDOM_STEPS.get(self.name, 0) if self.random_steps is None else self.random_steps

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> GameSpec:
        """A spec from a (Hydra) mapping such as {name: 2048, weight: 2, difficulty: {rows: 5}, reward: {...}}."""
        entry = _plain(entry)
        _check_keys(f"game {entry.get('name')!r}", entry, cls)
        reward = _plain(entry.pop("reward", None))
        _check_keys(f"game {entry.get('name')!r} reward", reward, RewardConfig)
        difficulty = _plain(entry.pop("difficulty", None))
        return cls(**entry, difficulty=difficulty, reward=RewardConfig(**reward))


def game_specs(mix: Mapping[str, Any]) -> tuple[GameSpec, ...]:
    """The specs of a Hydra `game` entry, a mapping {name: {weight, difficulty, random_steps, reward}, ...}."""
    return tuple(GameSpec.from_dict({"name": str(name), **(entry or {})}) for name, entry in _plain(mix).items())


@dataclass(frozen=True)
class PoolConfig:
    """A pool of games.

    Attributes:
        games: the mix (one entry for a single game).
        num_games: games in the pool; the mix's weights split them.
        seed: seeds the pool (and through it every game).
        mode: "reset" (each state: reset, then K random steps: the paper's way) or "continue" (each game keeps
            playing its episode, moved on by `GamePool.advance`).
    """

    games: tuple[GameSpec, ...]
    num_games: int = 128
    seed: int = 0
    mode: str = "reset"

    def __post_init__(self) -> None:
        if not self.games:
            raise ValueError("pool: key 'games' must list at least one game")
        if isinstance(self.num_games, bool) or not isinstance(self.num_games, int) or self.num_games < 1:
            raise ValueError(f"pool: key 'num_games' must be an integer >= 1; got {self.num_games!r}")
        if self.mode not in POOL_MODES:
            raise ValueError(f"pool: key 'mode' must be one of {', '.join(POOL_MODES)}; got {self.mode!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PoolConfig:
        """A pool config from a (Hydra) mapping whose 'games' is a list of GameSpec mappings or a `game_specs` mix."""
        config = _plain(config)
        _check_keys("pool", config, cls)
        games = config.pop("games", ())
        games = game_specs(games) if isinstance(games, Mapping) else tuple(GameSpec.from_dict(g) for g in games)
        return cls(games=games, **config)
