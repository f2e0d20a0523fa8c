"""Sharded and multi-host buffers: `shard(buffer, mesh, axis="data", sampling="local")`
lays a buffer's rows out over a mesh axis, with one sum tree per shard (see `ShardedBuffer`
and docs/sharding.md)."""

from flax_replay._src.layout import partition_names
from flax_replay._src.sharding import ShardedBuffer, shard

__all__ = ["ShardedBuffer", "shard", "partition_names"]
