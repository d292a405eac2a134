"""VLM-Gym: the games a vision-language model learns to see and reason in, their rewards, and the game pool.

    import envs
    game = envs.make("tetris", seed=0, rows=16)
    reward = envs.score(game, response)

Importing the package also registers every game with gymnasium (`VLMGym/Tetris-v0`, `VLMGym/2048-v0`,
`VLMGym/ShisenSho-v0`, `VLMGym/Swap-v0`). `envs.pool` and `envs.gym_env` call `envs.make` at run time, so
importing them from here, before `make` is defined, is fine.
"""

from typing import Any

from envs.base import ExpertMove, Game, Reward, StepResult
from envs.config import GameSpec, PoolConfig
from envs.experts import expert_response
from envs.game_2048 import Game2048
from envs.gym_env import register_all
from envs.pool import GamePool, PooledState
from envs.rewards import RewardConfig, score
from envs.shisen_sho import ShisenSho
from envs.swap import Swap
from envs.tetris import Tetris

GAMES: dict[str, type[Game]] = {cls.name: cls for cls in (Tetris, Game2048, ShisenSho, Swap)}


def make(name: str, seed: int = 0, **difficulty: Any) -> Game:
    """A new game by registry name; unknown names and knobs raise ValueError naming what is allowed."""
    if name not in GAMES:
        raise ValueError(f"unknown game {name!r}; allowed games: {', '.join(GAMES)}")
    return GAMES[name](seed=seed, **difficulty)


register_all()

__all__ = [
    "GAMES",
    "ExpertMove",
    "Game",
    "GamePool",
    "GameSpec",
    "PoolConfig",
    "PooledState",
    "Reward",
    "RewardConfig",
    "StepResult",
    "expert_response",
    "make",
    "score",
]
