"""tests/multidevice needs 8 devices, i.e. XLA_FLAGS set before jax is imported.

tests/test_transforms.py runs this directory in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; in a run with fewer
devices (the normal `pytest` run) its tests are not collected at all. To run
it by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      .venv/bin/python -m pytest -q tests/multidevice
"""

import jax

if jax.device_count() < 8:
  collect_ignore_glob = ["test_*.py"]
