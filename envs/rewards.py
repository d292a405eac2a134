"""Scoring one response on one game state: the game's shaped reward plus the format and perception rewards.

G1's reward is the game's shaped reward + a format reward (the three tag pairs present) + a perception reward (the
ground-truth board text inside the perception block). Two variants help small models learn and resist gaming:
partial format credit that counts only tag pairs present exactly once and in order (a policy games a loose check by
spamming tags), and a per-cell perception score.

Every response, however malformed or large, is scored without raising and in bounded time: only its last
`MAX_SCORE_CHARS` characters are looked at.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from envs.base import Game, Reward

# Twice the paper's longest response (8192 tokens at ~4 characters each): enough for any real answer, and a
# runaway generation costs no more than this to score.
MAX_SCORE_CHARS = 65536
TAG_PAIRS = (("<perception>", "</perception>"), ("<think>", "</think>"), ("<answer>", "</answer>"))
FORMAT_MODES = ("all", "partial", "tags")
PERCEPTION_MODES = ("exact", "cells", "off")


@dataclass(frozen=True)
class RewardConfig:
    """How a response is scored (the `reward` entry of a game in the game mix).

    Attributes:
        format_mode: "all" (the paper's: 1 iff the perception, think and answer tag pairs each appear exactly once,
            in that order), "partial" (1/3 per such pair, counting only pairs present once and in order) or "tags"
            (1/6 per tag present exactly once, a closing tag only after its opening one: the densest signal, for a
            randomly initialized model that almost never writes a whole pair).
        perception_mode: "exact" (1 iff the ground-truth text appears verbatim inside the perception block), "cells"
            (fraction of the ground truth's `|`-separated cells read correctly, position by position) or "off".
        game_weight: weight of the game's shaped reward in the total.
        format_weight: weight of the format reward in the total.
        perception_weight: weight of the perception reward in the total.
    """

    format_mode: str = "all"
    perception_mode: str = "exact"
    game_weight: float = 1.0
    format_weight: float = 1.0
    perception_weight: float = 1.0

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("format_mode", self.format_mode, FORMAT_MODES),
            ("perception_mode", self.perception_mode, PERCEPTION_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"reward key {key!r} must be one of {', '.join(allowed)}; got {value!r}")
        for key in ("game_weight", "format_weight", "perception_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reward key {key!r} must be a number; got {value!r}")


def _ordered_pairs(text: str) -> int:
    """How many tag pairs appear exactly once each, open before close, in the order perception, think, answer.

    A pair counts only if both its tags occur once; among those, the longest run that keeps the canonical order
    without overlapping counts (so `<think>..</think><perception>..</perception>` scores 1 pair, not 2).
    """
    spans = []
    for open_tag, close_tag in TAG_PAIRS:
        if text.count(open_tag) == 1 and text.count(close_tag) == 1:
            start, end = text.find(open_tag), text.find(close_tag)
            if start < end:
                spans.append((start, end))
    for size in range(len(spans), 0, -1):
        for chosen in itertools.combinations(spans, size):  # spans are in canonical order already
            if all(a[1] < b[0] for a, b in itertools.pairwise(chosen)):
                return size
    return 0


def _single_tags(text: str) -> int:
    """How many of the six tags appear exactly once, a closing tag counting only after its (single) opening tag."""
    found = 0
    for open_tag, close_tag in TAG_PAIRS:
        if text.count(open_tag) == 1:
            found += 1
            if text.count(close_tag) == 1 and text.find(close_tag) > text.find(open_tag):
                found += 1
    return found


def format_reward(text: str, mode: str) -> float:
    """Format reward in [0, 1] of a (tail-cut) response; see `RewardConfig.format_mode`."""
    if mode == "tags":
        return _single_tags(text) / (2 * len(TAG_PAIRS))
    pairs = _ordered_pairs(text)
    if mode == "all":
        return float(pairs == len(TAG_PAIRS))
    return pairs / len(TAG_PAIRS)


def _perception_block(text: str) -> str | None:
    open_tag, close_tag = TAG_PAIRS[0]
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start)
    if end < 0:
        return None
    return text[start + len(open_tag) : end]


def _cells(text: str, max_rows: int | None = None) -> list[list[str]]:
    """Non-blank lines split into stripped `|`-separated cells (at most `max_rows` lines are split)."""
    lines = [line for line in (raw.strip() for raw in text.strip().split("\n")) if line]
    return [[cell.strip() for cell in line.split("|")] for line in lines[:max_rows]]


def perception_reward(text: str, truth: str, mode: str) -> float:
    """Perception reward in [0, 1] of a (tail-cut) response against the ground-truth text observation."""
    if mode == "off":
        return 0.0
    block = _perception_block(text)
    if block is None:
        return 0.0
    if mode == "exact":
        return float(truth.strip() in block)
    truth_cells = _cells(truth)
    total = sum(len(row) for row in truth_cells)
    read = _cells(block, max_rows=len(truth_cells))
    correct = sum(
        sum(a == b for a, b in zip(truth_row, read_row, strict=False))
        for truth_row, read_row in zip(truth_cells, read, strict=False)
    )
    return correct / total if total else 0.0


def score(game: Game, response: str, config: RewardConfig | None = None) -> Reward:
    """Scores a response on a game state: its action is taken on a clone, so `game` itself never changes.

    Args:
        game: the state the response answers.
        response: the model's full response text (any string; non-strings score as an empty response).
        config: how to score; the paper's defaults when None.

    Returns:
        The reward breakdown; a response with no parseable action gets the game's invalid-action penalty.
    """
    config = config or RewardConfig()
    text = response[-MAX_SCORE_CHARS:] if isinstance(response, str) else ""
    action = game.parse_action(text)
    if action is None:
        game_reward = game.invalid_penalty
    else:
        game_reward = game.clone().step(action).reward
    fmt = format_reward(text, config.format_mode)
    perception = perception_reward(text, game.text_observation(), config.perception_mode)
    total = config.game_weight * game_reward + config.format_weight * fmt + config.perception_weight * perception
    return Reward(game=game_reward, format=fmt, perception=perception, total=total, valid_action=action is not None)
