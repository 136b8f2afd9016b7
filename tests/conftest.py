"""Shared test setup: float64 on (check_grads needs it)."""

import jax

jax.config.update("jax_enable_x64", True)
