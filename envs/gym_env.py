"""VLM-Gym games as gymnasium environments: an RGB frame in, an answer text out.

Each registered game is a `gymnasium.Env` (ids `VLMGym/Tetris-v0`, `VLMGym/2048-v0`, `VLMGym/ShisenSho-v0`,
`VLMGym/Swap-v0`, registered by `import envs`): the observation is the board frame, the action is the model's
response text (parsed as `envs.score` parses it), and the reward is the game's step reward, or its invalid-action
penalty when the text holds no legal action. `info` carries the ground-truth text observation and the prompt.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import envs
from envs.rewards import MAX_SCORE_CHARS

GYM_IDS = {
    "tetris": "VLMGym/Tetris-v0",
    "2048": "VLMGym/2048-v0",
    "shisen_sho": "VLMGym/ShisenSho-v0",
    "swap": "VLMGym/Swap-v0",
}


class VLMGymEnv(gym.Env[np.ndarray, str]):
    """One game as a gymnasium environment.

    Args:
        game: registry name ("tetris", "2048", "shisen_sho", "swap").
        render_mode: "rgb_array" (the frame, as the observation) or None.
        **difficulty: knob values for the game.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, game: str, render_mode: str | None = "rgb_array", **difficulty: Any) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of None, 'rgb_array'; got {render_mode!r}")
        self.game_name, self.difficulty, self.render_mode = game, difficulty, render_mode
        self.game = envs.make(game, seed=0, **difficulty)  # fails now on an unknown game or knob
        width, height = self.game.difficulty["image_size"]
        self.observation_space = spaces.Box(0, 255, shape=(height, width, 3), dtype=np.uint8)
        self.action_space = spaces.Text(max_length=MAX_SCORE_CHARS, min_length=0, charset=string.printable)

    def _info(self, **extra: Any) -> dict[str, Any]:
        return {
            "text_observation": self.game.text_observation(),
            "prompt": self.game.prompt,
            "score": self.game.score,
            **extra,
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        # A new game seeded from the env's rng: the same reset seed gives the same episode.
        self.game = envs.make(self.game_name, seed=int(self.np_random.integers(2**31)), **self.difficulty)
        return self.game.render_array(), self._info()

    def step(self, action: str) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        parsed = self.game.parse_action(action)
        result = self.game.step(parsed)
        info = self._info(valid_action=parsed is not None, **result.info)
        return self.game.render_array(), float(result.reward), result.terminated, False, info

    def render(self) -> np.ndarray | None:
        return self.game.render_array() if self.render_mode == "rgb_array" else None


def register_all() -> None:
    """Registers every game with gymnasium under its GYM_IDS id (idempotent)."""
    for name, gym_id in GYM_IDS.items():
        if gym_id not in gym.registry:
            gym.register(id=gym_id, entry_point="envs.gym_env:VLMGymEnv", kwargs={"game": name})
