"""Linen modules: `ReplayBuffer` keeps a buffer's state in the "replay" and "priorities"
collections."""

from flax_replay._src.linen import ReplayBuffer

__all__ = ["ReplayBuffer"]
