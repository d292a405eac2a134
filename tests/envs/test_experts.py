"""The scripted experts: full-credit responses, legal moves with honest reasons, and play clearly above random."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs.game_2048 import Game2048
from envs.shisen_sho import ClearingSearch, ShisenSho
from envs.swap import Swap, visible_clears

OWN_EXPERTS = ("2048", "shisen_sho", "swap")  # Tetris's expert lives with tetris.py and is tested there


def _states(name: str, seeds: range, random_steps: int, **difficulty) -> list[envs.Game]:
    """Games part-way through an episode: `random_steps` random legal steps (fewer if the episode ends first)."""
    games = []
    for seed in seeds:
        game = envs.make(name, seed=seed, **difficulty)
        rng = np.random.default_rng(seed)
        for _ in range(random_steps):
            if len(game.legal_actions()) < 2:
                break
            game.step(game.random_legal_action(rng))
        games.append(game)
    return games


def _play(game: envs.Game, policy: str, max_steps: int) -> envs.Game:
    """Plays `game` to its end (or `max_steps`) with its expert or uniformly random legal moves; returns it."""
    rng = np.random.default_rng(game.seed)
    while not game.terminated and game.steps < max_steps:
        game.step(game.expert_move().action if policy == "expert" else game.random_legal_action(rng))
    return game


@pytest.mark.parametrize("name", sorted(envs.GAMES))
def test_expert_response_gets_full_format_and_perception_credit_and_its_action_reward(name):
    for game in _states(name, range(3), random_steps=5):
        move = game.expert_move()
        response = envs.expert_response(game)
        reward = envs.score(game, response)
        assert (reward.format, reward.perception, reward.valid_action) == (1.0, 1.0, True)
        assert reward.game == game.clone().step(move.action).reward
        assert game.parse_action(response) == move.action
        assert f"<think>{move.reason}</think>" in response
        assert response.startswith(f"<perception>\n{game.text_observation()}\n</perception>\n")


@pytest.mark.parametrize("name", sorted(envs.GAMES))
def test_expert_leaves_the_game_unchanged_and_refuses_an_ended_episode(name):
    game = _states(name, range(1), random_steps=5)[0]
    before, rng_state = game.text_observation(), game.rng.bit_generator.state
    game.expert_move()
    assert game.text_observation() == before and game.rng.bit_generator.state == rng_state
    game.terminated = True
    with pytest.raises(ValueError, match="episode is over"):
        game.expert_move()


@pytest.mark.parametrize("name", OWN_EXPERTS)
def test_expert_moves_are_legal_and_their_reasons_name_them(name):
    for game in _states(name, range(4), random_steps=10):
        move = game.expert_move()
        assert move.action in game.legal_actions()
        assert game.format_action(move.action) in move.reason


def test_the_base_game_has_no_expert_and_says_which_game_lacks_one():
    with pytest.raises(NotImplementedError, match="2048: this game has no scripted expert"):
        envs.Game.expert_move(Game2048(seed=0))


def test_2048_expert_scores_several_times_what_random_play_does():
    """300 expert moves score > 2x a whole random episode (random play dies at ~1000 points with a 64 or 128)."""
    for seed in range(3):
        expert = _play(Game2048(seed=seed), "expert", max_steps=300)
        random = _play(Game2048(seed=seed), "random", max_steps=10_000)
        assert expert.score > 2 * random.score
        assert max(map(max, expert.board)) >= 256 > max(map(max, random.board))


def test_2048_corner_expert_takes_the_first_move_of_its_order_that_changes_the_board_and_says_so():
    """Down moves: down. Down blocked: left. Down and left blocked: right. Only up moves: up. Its reason lists each
    move it tried until one moved, and a response built on it gets full credit (it is a cold-start teacher)."""
    boards = {
        "down": [[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        "left": [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 2, 4, 8]],
        "right": [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [2, 4, 8, 0]],
        "up": [[0, 0, 0, 0], [0, 0, 0, 0], [2, 4, 8, 16], [4, 8, 16, 32]],
    }
    order = ["down", "left", "right", "up"]
    for answer, board in boards.items():
        game = Game2048(seed=0, expert="corner")
        game.set_board(board)
        move = game.expert_move()
        assert game.format_action(move.action) == answer
        tried = order[: order.index(answer)]
        assert move.reason.endswith(", ".join([f"{m} blocked" for m in tried] + [f"{answer} moves"]) + ".")
        reward = envs.score(game, envs.expert_response(game))
        assert (reward.format, reward.perception, reward.valid_action) == (1.0, 1.0, True)
    with pytest.raises(ValueError, match="'expert'.*'expectimax', 'corner'"):
        Game2048(seed=0, expert="greedy")


def test_2048_corner_expert_beats_random_play_and_the_expectimax_expert_beats_it():
    """200 moves from reset, seeds 0-3: random legal moves < the corner rule < expectimax (the teacher row)."""
    scores = {"random": 0.0, "corner": 0.0, "expectimax": 0.0}
    for seed in range(4):
        scores["random"] += _play(Game2048(seed=seed), "random", max_steps=200).score
        for expert in ("corner", "expectimax"):
            scores[expert] += _play(Game2048(seed=seed, expert=expert), "expert", max_steps=200).score
    assert 1.3 * scores["random"] < scores["corner"] < scores["expectimax"]


def test_shisen_sho_expert_clears_boards_that_random_play_gets_stuck_on():
    """On 8 x 12 boards (24 tile types) random play gets stuck on most deals; the expert clears every one."""
    experts = [_play(ShisenSho(seed=seed, rows=8, cols=12), "expert", 100) for seed in range(4)]
    randoms = [_play(ShisenSho(seed=seed, rows=8, cols=12), "random", 100) for seed in range(4)]
    assert all(game.score == 48 for game in experts)
    assert sum(game.score < 48 for game in randoms) >= 2


def test_shisen_sho_expert_keeps_a_clearable_board_clearable_through_safe_pairs():
    """From deals that a complete search proves clearable, every pair the expert removes keeps the board clearable
    (checked by a fresh search, and for safe pairs without any search) and it clears the board."""
    safe_pairs = 0
    for seed in range(6):
        game = ShisenSho(seed=seed, rows=8, cols=8)
        assert ClearingSearch(100_000).run(game._pairs)  # these deals can be cleared
        while not game.terminated:
            safe, action = game._pairs.safe_pair(), game.expert_move().action
            safe_pairs += safe is not None
            after = game.clone()
            after.step(safe or action)
            assert ClearingSearch(100_000).run(after._pairs)
            game.step(action)
        assert game._pairs.tiles == 0
    assert safe_pairs > 50


def test_swap_visible_clears_follows_a_cascade_of_board_tiles_and_never_matches_new_tiles():
    # Swapping (3, 0) and (3, 1) lines up three 0s in column 0; they clear, the 1 above falls to row 4 and lines up
    # with the two 1s there (a second wave). The three unknown new tiles above must not count as a line.
    board = [[5, 6, 7], [1, 8, 9], [0, 10, 11], [2, 0, 3], [0, 1, 1]]
    assert visible_clears(np.array(board), ((3, 0), (3, 1))) == (6, 2)
    game = Swap(seed=0, rows=5, cols=3)
    game.set_board(board)
    move = game.expert_move()
    assert move.action == ((3, 0), (3, 1)) and "clears 6" in move.reason and "2 waves" in move.reason


def test_swap_expert_clears_more_tiles_than_random_play():
    """Each move the expert clears the most tiles it can see; over 6 seeded episodes that is clearly above random."""
    for game in _states("swap", range(3), random_steps=5):
        best = max(visible_clears(game.board, a)[0] for a in game.legal_actions())
        assert visible_clears(game.board, game.expert_move().action)[0] == best
    expert = sum(_play(Swap(seed=seed), "expert", 100).score for seed in range(6))
    random = sum(_play(Swap(seed=seed), "random", 100).score for seed in range(6))
    assert expert > 1.04 * random
