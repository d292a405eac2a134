"""Trajectory groups and the shared buffer that carries them from the rollout actors to the learner."""

from replay.buffer import DROP_REASONS, BufferItem, BufferStats, ReplayBuffer
from replay.config import BufferConfig
from replay.trajectory import TrajectoryGroup

__all__ = ["DROP_REASONS", "BufferConfig", "BufferItem", "BufferStats", "ReplayBuffer", "TrajectoryGroup"]
