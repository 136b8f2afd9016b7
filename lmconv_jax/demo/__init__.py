"""The demo behind ``python -m lmconv_jax demo``: what a landmark convolution
learns that a box convolution cannot.

``data`` makes the spatial-relation data set, ``models`` the four matched
models, ``train`` trains one, ``figures`` draws, ``experiment`` runs it all.
"""

from lmconv_jax.demo.experiment import (
  DemoConfig,
  format_table,
  run_demo,
  verdict,
)

__all__ = ["DemoConfig", "format_table", "run_demo", "verdict"]
