"""Run Flashbax's own tests against flax_replay: resolve `flashbax` to `flax_replay`.

Used as the entry point of a subprocess (``python flashbax_alias.py <pytest args>``) by
``tests/test_flashbax_suite.py``. A meta path finder makes every ``flashbax`` and
``flashbax.<module>`` import return the flax_replay module of the same path
(``flashbax.buffers.trajectory_buffer`` -> ``flax_replay.buffers.trajectory_buffer``), except
the test files and fixtures that ship in the installed Flashbax wheel (``*_test`` modules and
``conftest``): those are loaded, unmodified, from the installed Flashbax package, so the tests
run as written with only their imports resolved to our API. Nothing of Flashbax is copied here,
and Flashbax's own implementation is never imported in that process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Sequence

ALIASED = "flashbax"
TARGET = "flax_replay"


def flashbax_dir() -> str:
    """Directory of the installed Flashbax package, found without importing it."""
    spec = importlib.machinery.PathFinder.find_spec(ALIASED)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("flashbax is not installed: `pip install flashbax==0.1.3`")
    return list(spec.submodule_search_locations)[0]


def _is_test_file(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "conftest" or leaf.endswith("_test")


class _ExistingModule(importlib.abc.Loader):
    """Loader that hands back an already imported flax_replay module under Flashbax's name."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        # Already executed when flax_replay imported it; running it again would rebuild classes.
        return None


class FlashbaxAlias(importlib.abc.MetaPathFinder):
    """``flashbax[.x.y]`` -> ``flax_replay[.x.y]``; Flashbax's test files from the wheel."""

    def __init__(self, root: str) -> None:
        self._root = root

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != ALIASED and not fullname.startswith(ALIASED + "."):
            return None
        parts = fullname.split(".")[1:]
        if _is_test_file(fullname):
            # The test file itself, unmodified, from the installed wheel.
            location = os.path.join(self._root, *parts) + ".py"
            return importlib.util.spec_from_file_location(fullname, location)
        module = importlib.import_module(".".join([TARGET, *parts]))
        # A package in Flashbax (`flashbax.vault`, whose tests live inside it) may be a plain
        # module here: it is then given an empty `__path__` in this process, so that the
        # test files under it import (they are found by this finder, not on that path).
        theirs_is_package = os.path.isdir(os.path.join(self._root, *parts))
        return importlib.machinery.ModuleSpec(
            fullname,
            _ExistingModule(module),
            is_package=hasattr(module, "__path__") or theirs_is_package,
        )


def install() -> None:
    """Put the alias first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, FlashbaxAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, FlashbaxAlias(flashbax_dir()))
    for name in [m for m in sys.modules if m == ALIASED or m.startswith(ALIASED + ".")]:
        del sys.modules[name]  # nothing of the real Flashbax may stay loaded


def jax_compat() -> None:
    """Flashbax 0.1.3's tests call ``jax.tree_map``, removed from jax since; give it back in this
    process only, so that those tests measure flax_replay rather than jax's deprecations."""
    import jax

    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map  # type: ignore[attr-defined]


if __name__ == "__main__":
    install()
    jax_compat()
    import pytest

    code = pytest.main(sys.argv[1:])
    # Proof for the harness that the tests ran against flax_replay, not Flashbax.
    if getattr(sys.modules.get(ALIASED), "__name__", None) == TARGET:
        print("flashbax resolved to flax_replay")
    raise SystemExit(code)
