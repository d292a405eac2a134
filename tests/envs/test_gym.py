"""The gymnasium wrappers: check_env for every registered id, seeding, and the text-action step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.gym_env import GYM_IDS


def test_every_game_has_a_gym_id():
    assert set(GYM_IDS) == set(envs.GAMES)
    assert set(GYM_IDS.values()) <= set(gym.registry)


@pytest.mark.parametrize("gym_id", sorted(GYM_IDS.values()))
def test_check_env(gym_id):
    env = gym.make(gym_id, image_size=(336, 448))
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=3)
    assert obs.shape == (448, 336, 3) and obs.dtype == np.uint8
    assert set(info) >= {"text_observation", "prompt"}


@pytest.mark.parametrize("name", sorted(GYM_IDS))
def test_reset_seed_gives_the_same_episode_and_step_plays_the_answer(name):
    env = gym.make(GYM_IDS[name])
    obs_a, info_a = env.reset(seed=11)
    obs_b, info_b = env.reset(seed=11)
    assert np.array_equal(obs_a, obs_b) and info_a["text_observation"] == info_b["text_observation"]
    game = env.unwrapped.game
    action = game.legal_actions()[0]
    expected = game.clone().step(action)
    obs, reward, terminated, truncated, info = env.step(
        f"<think>...</think><answer>{game.format_action(action)}</answer>"
    )
    assert reward == expected.reward and terminated == expected.terminated and not truncated
    assert info["valid_action"] and info["text_observation"] == game.text_observation()
    assert np.array_equal(obs, game.render_array())
    _, reward, _, _, info = env.step("I give up")
    assert reward == game.invalid_penalty and not info["valid_action"]


def test_bad_game_and_knob_errors():
    with pytest.raises(ValueError, match="allowed games"):
        envs.gym_env.VLMGymEnv("chess")
    with pytest.raises(ValueError, match="'rows'"):
        gym.make("VLMGym/2048-v0", rows=99)
