"""The one game interface every VLM-Gym game implements, its result types, and the difficulty-knob checks.

A game is a plain, deterministic Python object: all randomness comes from `self.rng`, a numpy Generator seeded at
construction, so `clone()` (a deep copy, RNG included) gives an independent game that replays exactly the same future.
That is what GRPO's "parallel actions" need: G responses to one state, each scored on its own copy.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

# Answers longer than this are cut (from the front) before parsing: a runaway generation must not make parsing slow.
MAX_PARSE_CHARS = 4096


@dataclass(frozen=True)
class StepResult:
    """What `Game.step` returns: the shaped training reward, whether the episode ended, and game-specific details."""

    reward: float
    terminated: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    """One response's reward, split into its parts (`envs.score` computes it; trajectories carry it)."""

    game: float  # the game's shaped reward for the response's action (the invalid-action penalty when it has none)
    format: float  # format reward in [0, 1]
    perception: float  # perception reward in [0, 1]
    total: float  # the weighted sum that advantages are computed from
    valid_action: bool  # whether the response held a parseable action


@dataclass(frozen=True)
class ExpertMove:
    """The game's own scripted solver's choice for the current state (`Game.expert_move`).

    The expert is the reference "teacher" of every results table and the source of supervised (SFT) responses, so
    its reason must be honest: what the solver saw and why it chose the action, never a rationalization added later.
    """

    action: Any  # a legal action of the current state
    reason: str  # one or two short sentences: what it saw, what it chose, why (it names the action)


@dataclass(frozen=True)
class Knob:
    """One difficulty knob: its default, a check that returns an error text (or None when the value is fine)."""

    default: Any
    check: Callable[[Any], str | None]
    doc: str


def int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"an integer in [{lo}, {hi}]"

    return check


def float_in(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and lo <= float(v) <= hi
        return None if ok else f"a number in [{lo}, {hi}]"

    return check


def one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed)

    return check


class Game(abc.ABC):
    """Base class of the games. Subclasses set `name`, `knobs`, `invalid_penalty` and implement the abstract methods.

    Args:
        seed: seeds `self.rng`, the only source of randomness of the game.
        **difficulty: values for the knobs in `knobs`; unknown keys and bad values raise ValueError naming the key and
            what is allowed.
    """

    name: ClassVar[str]
    knobs: ClassVar[dict[str, Knob]]
    invalid_penalty: ClassVar[float] = -1.0  # reward of a response that holds no valid action

    def __init__(self, seed: int = 0, **difficulty: Any) -> None:
        self.difficulty = self.check_difficulty(difficulty)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.terminated = False
        self.score = 0.0  # evaluation score of the episode so far (lmgame-Bench style where the game defines one)
        self.steps = 0
        self.reset()

    @classmethod
    def check_difficulty(cls, difficulty: dict[str, Any]) -> dict[str, Any]:
        """Fills in defaults and validates every knob; the error names the game, the key and the allowed values."""
        unknown = sorted(set(difficulty) - set(cls.knobs))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown difficulty key {unknown[0]!r}; allowed keys: {', '.join(sorted(cls.knobs))}"
            )
        values = {key: difficulty.get(key, knob.default) for key, knob in cls.knobs.items()}
        for key, knob in cls.knobs.items():
            value = values[key]
            if isinstance(value, list):  # Hydra/YAML hands tuples over as lists
                value = values[key] = tuple(value)
            problem = knob.check(value)
            if problem:
                raise ValueError(f"{cls.name}: difficulty key {key!r} must be {problem}; got {value!r}")
        return cls.check_combination(values)

    @classmethod
    def check_combination(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Cross-knob checks (e.g. enough cells for the tile types); override to raise ValueError naming the keys."""
        return values

    # ---- the contract of design.md ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def reset(self) -> None:
        """Starts a new episode from `self.rng`."""

    @property
    @abc.abstractmethod
    def prompt(self) -> str:
        """Rules, the action format, and the <perception>/<think>/<answer> convention."""

    @abc.abstractmethod
    def render_array(self) -> np.ndarray:
        """The board as an (H, W, 3) uint8 array of size `difficulty['image_size']`: the fast path of pools and
        benchmarks (a PIL round trip costs about a millisecond per frame, more than a Tetris step)."""

    def render(self) -> Image.Image:
        """The board as an RGB image of size `difficulty['image_size']`."""
        return Image.fromarray(self.render_array())

    @abc.abstractmethod
    def text_observation(self) -> str:
        """Ground-truth text of the board: the perception target."""

    @abc.abstractmethod
    def parse_answer(self, answer: str) -> Any | None:
        """Parses the text inside <answer></answer> (already extracted); None when it holds no well-formed action."""

    @abc.abstractmethod
    def format_action(self, action: Any) -> str:
        """Canonical answer text; `parse_action(format_action(a)) == a`."""

    @abc.abstractmethod
    def legal_actions(self) -> list[Any]:
        """Actions that the rules allow now (an empty list once the episode is over)."""

    @abc.abstractmethod
    def step(self, action: Any) -> StepResult:
        """Applies `action` (None or an illegal action: the invalid-action penalty, board unchanged)."""

    def expert_move(self) -> ExpertMove:
        """The scripted expert's action for the current state and its reason (the episode must not be over).

        Not abstract: a game without an expert is still a game to train on; each game overrides this.
        """
        raise NotImplementedError(f"{self.name}: this game has no scripted expert")

    def random_legal_action(self, rng: np.random.Generator) -> Any | None:
        """A uniformly random legal action drawn from `rng` (a pool's random steps); None once the episode is over.

        An override may only make it cheaper: it must draw exactly as this does, one `rng.integers(len(legal))`
        indexing `legal_actions()`, so that a pool's states do not depend on which games override it.
        """
        legal = self.legal_actions()
        return legal[rng.integers(len(legal))] if legal else None

    # ---- shared mechanism -----------------------------------------------------------------------------------------
    def parse_action(self, text: str) -> Any | None:
        """The action in a response: the last <answer>...</answer> block if there is one, else the whole text.

        Never raises: anything malformed, of the wrong type or huge gives None.
        """
        if not isinstance(text, str):
            return None
        text = text[-MAX_PARSE_CHARS:]
        end = text.rfind("</answer>")
        start = text.rfind("<answer>", 0, end if end >= 0 else len(text))
        if start >= 0:
            text = text[start + len("<answer>") : end if end > start else len(text)]
        try:
            return self.parse_answer(text.strip())
        except (ValueError, TypeError, IndexError, KeyError, OverflowError):
            return None

    def clone(self) -> Game:
        """An independent copy, RNG included: stepping it never changes the original."""
        return copy.deepcopy(self)
