#!/usr/bin/env bash
# The comparative benchmark on whatever accelerator this machine has (GPU or TPU; CPU works
# too), in one command:
#
#   bash benchmarks/device.sh            # about 5-8 minutes; writes benchmarks/results/<platform>/
#   bash benchmarks/device.sh --smoke    # tiny sizes: checks that it runs (CI runs this on CPU)
#
# It makes a virtual environment in .device-venv with this repository, the bench extra and the
# JAX build for the accelerator found (nvidia-smi: CUDA 12; a TPU device: jax[tpu]), then runs
# `python -m benchmarks.run --device` (flax_replay vs Flashbax: prioritised flat buffers, add of
# 1 and 128 rows, sample, set_priorities, sample+set_priorities, single calls and in a scan,
# at 1e5 and 1e6 items, (8,) float32 and (84, 84) uint8 items). Extra arguments are passed on.
# FLAX_REPLAY_NO_INSTALL=1 skips the environment and uses `python3` (or $PYTHON) as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ "${FLAX_REPLAY_NO_INSTALL:-0}" != 1 ]; then
  "$py" -m venv .device-venv
  py=.device-venv/bin/python
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install --quiet -e ".[bench]"
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$py" -m pip install --quiet "jax[cuda12]"
  elif [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then
    "$py" -m pip install --quiet "jax[tpu]"
  fi
fi
unset JAX_PLATFORMS  # benchmarks/run.py defaults to the CPU only when nothing is set
exec "$py" -m benchmarks.run --device "$@"
