"""The game pool: weighted mixes, the paper's reset-and-random-steps states, continued episodes, and scoring."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import envs
from envs import GamePool, GameSpec, PoolConfig
from envs.config import game_specs
from envs.pool import _split


def test_split_is_proportional_and_exact():
    assert _split([3, 1], 8) == [6, 2]
    assert _split([1, 1, 1], 10) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(_split([0.2, 0.5, 0.3], 17)) == 17


def test_weighted_mix_proportions_and_interleaving():
    pool = GamePool([GameSpec("2048", weight=3), GameSpec("swap", weight=1)], num_games=40, seed=0)
    names = [spec.name for spec in pool.slot_specs]
    assert collections.Counter(names) == {"2048": 30, "swap": 10}
    assert all("swap" in names[i : i + 4] for i in range(0, 40, 4))  # any 4 consecutive slots mix the games
    states = pool.sample(80)
    assert collections.Counter(s.game_name for s in states) == {"2048": 60, "swap": 20}
    assert len({s.state_id for s in states}) == 80


def test_reset_mode_takes_k_random_steps_and_hands_out_snapshots():
    pool = GamePool([GameSpec("swap", random_steps=7)], num_games=4, seed=1)
    states = pool.sample(6)
    for state in states:
        game = state.game
        assert game.steps == 7  # swap episodes last 100 moves: no restart within 7 steps
        assert state.text_observation == game.text_observation() and state.prompt == game.prompt
        assert np.array_equal(state.image, game.render_array()) and state.image.shape == (840, 644, 3)
    before = [s.text_observation for s in states]
    pool.sample(6)
    assert [s.game.text_observation() for s in states] == before  # the pool never touches a handed-out game


def test_default_random_steps_follow_the_paper():
    assert GameSpec("2048").steps_after_reset == 100 and GameSpec("shisen_sho").steps_after_reset == 250
    assert GameSpec("swap").steps_after_reset == 0 and GameSpec("tetris").steps_after_reset == 0
    state = GamePool([GameSpec("2048", random_steps=30)], num_games=1, seed=0).sample(1)[0]
    assert 0 < state.game.steps <= 30 and not state.game.terminated


@pytest.mark.parametrize("name", list(envs.GAMES))
def test_random_legal_action_draws_one_index_into_legal_actions(name):
    game, rng, twin = envs.make(name, seed=0), np.random.default_rng(0), np.random.default_rng(0)
    for _ in range(20):
        legal = game.legal_actions()
        action = game.random_legal_action(rng)
        assert action == legal[twin.integers(len(legal))]
        game.step(action)
        if game.terminated:
            assert game.random_legal_action(rng) is None
            game.reset()


def test_shisen_sho_states_do_not_depend_on_its_cheaper_random_action(monkeypatch):
    def states():
        pool = GamePool([GameSpec("shisen_sho", difficulty={"rows": 4, "cols": 6})], num_games=3, seed=2)
        return [(s.text_observation, s.game.steps, s.game.seed) for s in pool.sample(6)]

    fast = states()
    monkeypatch.setattr(envs.ShisenSho, "random_legal_action", envs.Game.random_legal_action)
    assert states() == fast


def test_same_seed_same_states():
    def texts(seed):
        pool = GamePool([GameSpec("2048", random_steps=10), GameSpec("tetris")], num_games=4, seed=seed)
        return [s.text_observation for s in pool.sample(8)]

    assert texts(5) == texts(5) and texts(5) != texts(6)


def test_continue_mode_advances_and_resets_finished_episodes():
    pool = GamePool([GameSpec("swap", difficulty={"max_moves": 3})], num_games=2, seed=0, mode="continue")
    first = pool.sample(2)
    assert [s.game.steps for s in first] == [0, 0]
    legal = first[0].game.legal_actions()[0]
    expected = first[0].game.clone()
    expected.step(legal)
    assert pool.advance(first[0], f"<answer>{first[0].game.format_action(legal)}</answer>").reward == 1.0
    assert pool.advance(first[1], "no idea").reward == 1.0  # unparseable -> a random legal (scoring) swap
    second = pool.sample(2)
    assert second[0].text_observation == expected.text_observation() and second[1].game.steps == 1
    with pytest.raises(ValueError, match="latest snapshot"):
        pool.advance(first[0], "up")
    for _ in range(2):  # moves 2 and 3 end the episodes; the next sample starts new ones
        for state in second:
            pool.advance(state, "")
        second = pool.sample(2)
    assert [s.game.steps for s in second] == [0, 0]
    with pytest.raises(ValueError, match="at most num_games"):
        pool.sample(3)


def test_score_equals_independent_envs_score():
    reward = envs.RewardConfig(format_mode="partial", perception_mode="cells")
    pool = GamePool([GameSpec("2048", reward=reward, random_steps=5)], num_games=2, seed=0)
    state = pool.sample(1)[0]
    responses = [
        f"<perception>{state.text_observation}</perception><answer>{a}</answer>"
        for a in ("up", "right", "down", "left")
    ] + ["<think>hmm", ""]
    assert pool.score(state, responses) == [envs.score(state.game, r, reward) for r in responses]
    assert state.game.text_observation() == state.text_observation  # each scored on a clone


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="allowed games: tetris, 2048, shisen_sho, swap"):
        GamePool([GameSpec("chess")], num_games=1)
    with pytest.raises(ValueError, match="'rows'"):
        GamePool([GameSpec("2048", difficulty={"rows": 0})], num_games=1)
    with pytest.raises(ValueError, match="'mode'"):
        GamePool([GameSpec("2048")], num_games=1, mode="replay")
    with pytest.raises(ValueError, match="'weight'"):
        GameSpec("2048", weight=0)
    with pytest.raises(ValueError, match="'random_steps'"):
        GameSpec("2048", random_steps=-1)
    with pytest.raises(ValueError, match="no slot"):
        GamePool([GameSpec("2048", weight=100), GameSpec("swap")], num_games=2)
    with pytest.raises(ValueError, match="mode 'continue'"):
        pool = GamePool([GameSpec("2048")], num_games=1)
        pool.advance(pool.sample(1)[0], "up")


def test_pool_config_from_hydra_style_dicts():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "num_games": 4,
            "mode": "continue",
            "games": [
                {"name": "2048", "weight": 1, "difficulty": {"rows": 3, "image_size": [336, 336]}},
                {"name": "swap", "weight": 1, "reward": {"format_mode": "partial"}},
            ],
        }
    )
    config = PoolConfig.from_dict(cfg)
    assert config.games[1].reward.format_mode == "partial" and config.games[0].difficulty["rows"] == 3
    state = GamePool.from_config(config).sample(1)[0]
    assert state.image.shape == (336, 336, 3)
    mix = OmegaConf.create({"2048": {"weight": 3, "random_steps": None}, "swap": {"reward": {}}})  # configs/game
    assert [(s.name, s.weight, s.steps_after_reset) for s in game_specs(mix)] == [("2048", 3, 100), ("swap", 1.0, 0)]
    assert PoolConfig.from_dict({"games": mix, "num_games": 4}).games == game_specs(mix)
    with pytest.raises(ValueError, match="unknown key 'difficulty_'; allowed keys: name, weight"):
        GameSpec.from_dict({"name": "2048", "difficulty_": {}})
    with pytest.raises(ValueError, match="reward: unknown key 'fmt'"):
        GameSpec.from_dict({"name": "2048", "reward": {"fmt": "all"}})
    with pytest.raises(ValueError, match="pool: unknown key 'size'"):
        PoolConfig.from_dict({"games": [{"name": "2048"}], "size": 3})
