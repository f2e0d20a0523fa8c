"""`flashbax.buffers.sum_tree`: only the state type. Our tree (exact, wide, with a min tree;
`flax_replay._src.sum_tree`) has another layout, so Flashbax's node-level functions
(`get_tree_index`, `set_batch_scan`, ...) are intentionally absent (see
tests/test_flashbax_names.py)."""

from flax_replay._src.priorities import PriorityState as SumTreeState

__all__ = ["SumTreeState"]
