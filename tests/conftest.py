"""Shared test setup: jax's defaults, float64 only where a test asks for it.

``jax_enable_x64`` stays off (jax's default, what users get) except in tests
marked ``x64`` (``@pytest.mark.x64``, ``pytest.param(..., marks=...)`` or a
module's ``pytestmark``): those run inside ``jax.enable_x64(True)``, which
ends with the test, failed or not. jit's cache key includes the flag, so a
function traced both ways keeps each dtype. A test that switches the flag
globally (``jax.config.update``) and does not switch it back fails.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _x64_only_where_marked(request):
  before = jax.config.jax_enable_x64
  if request.node.get_closest_marker("x64") is None:
    yield
  else:
    with jax.enable_x64(True):
      yield
  if jax.config.jax_enable_x64 != before:
    jax.config.update("jax_enable_x64", before)
    pytest.fail(f"{request.node.nodeid} left jax_enable_x64 switched; "
                "mark it x64 instead", pytrace=False)
