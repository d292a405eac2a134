"""The scripted experts' complete responses, written in the training convention.

Each game's `expert_move` picks an action and says why; `expert_response` wraps it the way a policy should answer:
the exact ground-truth board inside <perception> (laid out as the games' prompts show it, one row per line), the
expert's reason inside <think>, the canonical action inside <answer>. `envs.score` gives such a response full format
credit, full perception credit and the action's game reward, so it is both an SFT target and the "teacher" row of
every results table.
"""

from __future__ import annotations

from envs.base import Game


def expert_response(game: Game) -> str:
    """The expert's full response to the current state of `game` (which it does not change).

    Raises:
        NotImplementedError: the game has no scripted expert.
    """
    move = game.expert_move()
    return (
        f"<perception>\n{game.text_observation()}\n</perception>\n"
        f"<think>{move.reason}</think>\n"
        f"<answer>{game.format_action(move.action)}</answer>"
    )
