"""Test setup: 8 host devices (must be set before JAX starts), a compilation cache shared by
the programs the tests launch, and hypothesis profiles."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session, shared by the test processes (xdist's
# workers) and the examples and jobs that tests launch (the DQN example alone is launched 7
# times with the same flags): a program compiled once is not compiled again. Compiled
# programs read from it are the same executables (their HLO text included, which some tests
# read). The first process to get here (pytest, or xdist's controller) makes the directory;
# the workers and subprocesses inherit it through the environment.
_CACHE = "FLAX_REPLAY_TEST_COMPILATION_CACHE"
if _CACHE not in os.environ:
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="flax_replay_jax_cache_")
    atexit.register(shutil.rmtree, os.environ[_CACHE], True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

from hypothesis import HealthCheck, settings  # noqa: E402

# 15 examples per property keeps the suite inside its 10-minute budget on 2 cores (CI);
# HYPOTHESIS_PROFILE=thorough runs 300, with fresh random examples.
settings.register_profile(
    "default",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
