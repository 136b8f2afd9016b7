"""``python -m lmconv_jax``: see lmconv_jax/cli.py."""

import sys

from lmconv_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
