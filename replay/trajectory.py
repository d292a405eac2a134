"""The unit that travels from rollout actors through the buffer to the learner: one game state, G responses.

A `TrajectoryGroup` is put into Ray's object store once by the actor that made it; the buffer and the learner only
pass its reference or the deserialized object around, so the board image (a numpy array, which Ray stores without
copying) is never re-encoded per hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.base import Reward


@dataclass
class TrajectoryGroup:
    """G responses sampled from one game state, each scored from its own clone of that state."""

    game: str  # registry name, e.g. "tetris"
    state_id: str  # unique per state: "<actor>-<round>-<index>"
    image: np.ndarray  # (H, W, 3) uint8, the board exactly as the model saw it
    prompt_text: str  # the chat-templated prompt (with the image placeholder) given to the engine
    prompt_ids: list[int]  # (P,) prompt token ids as the engine saw them, image pads expanded
    response_ids: list[list[int]]  # G x (T_i,) sampled token ids, EOS included when generated
    response_logprobs: list[list[float]]  # G x (T_i,) the sampler's log-prob of each sampled token
    response_texts: list[str]  # G decoded responses (for logging and debugging)
    rewards: list[Reward]  # G reward breakdowns
    policy_version: int  # the oldest version any response was generated under (the buffer's staleness bound uses it)
    text_observation: str  # ground-truth board text (the perception target)
    finished: list[bool] = field(default_factory=list)  # G: True where the response ended with EOS, not a length cut
    # G x (first, last): the policy versions each response was generated under, at its submission and at its end
    # (a weight update while it was in flight makes first < last; a sync round's are all (v, v)). Empty: not recorded.
    response_versions: list[tuple[int, int]] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return len(self.response_ids)

    def total_rewards(self) -> np.ndarray:
        """(G,) float32 total rewards, the input of the group-relative advantage."""
        return np.array([r.total for r in self.rewards], dtype=np.float32)
