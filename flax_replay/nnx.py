"""NNX modules: `ReplayBuffer` keeps a buffer's state in `Replay` and `Priorities` Variables."""

from flax_replay._src.nnx import Priorities, Replay, ReplayBuffer

__all__ = ["ReplayBuffer", "Replay", "Priorities"]
