"""Offline datasets in Flashbax's Vault format: `Vault`, `into_buffer`, `inspect`.

`python -m flax_replay.vault <path>` prints what a vault holds (structure, steps, bytes on
disk, compression). See `flax_replay._src.vault` for the on-disk format.
"""

from flax_replay._src.vault import Vault, VaultError

__all__ = ["Vault", "VaultError"]
