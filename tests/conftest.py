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
    pytest.fail(
      f"{request.node.nodeid} left jax_enable_x64 switched; "
      "mark it x64 instead",
      pytrace=False,
    )


# --------------------------------------------------------------------------
# Subprocess suites started at collection time.
#
# A test marked ``@pytest.mark.background.with_args(start)`` runs a long
# subprocess: ``start()`` returns a ``subprocess.Popen`` whose output goes to
# a file, never to a pipe nobody reads (``with_args``: a bare function as the
# marker's one argument would be taken for the decorated test). It is started
# as soon as collection has selected the test, so it runs on the second core
# while the rest of the session runs on the first; the test waits for it
# through the ``background`` fixture. A session that ends first (``-x``,
# Ctrl-C) kills what it started.

_BACKGROUND = pytest.StashKey()


def pytest_collection_finish(session):
  if session.config.option.collectonly:
    return
  for item in session.items:  # what -k, -m and the rest left selected
    marker = item.get_closest_marker("background")
    if marker is not None:
      item.stash[_BACKGROUND] = marker.args[0]()


@pytest.fixture
def background(request):
  """The subprocess the test's ``background`` marker started at collection."""
  return request.node.stash[_BACKGROUND]


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  for item in session.items:
    proc = item.stash.get(_BACKGROUND, None)
    if proc is not None and proc.poll() is None:
      proc.kill()
      proc.wait()
