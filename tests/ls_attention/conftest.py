"""Shared fixtures for the LS-attention tests."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_rank_promotion(request):
  # Catches silent broadcasting bugs in ls_attention (nanodo habit). Not for the module tests:
  # common.layers (RMSNorm weight * x, RoPE) relies on rank promotion.
  if request.module.__name__.endswith("test_modules"):
    yield
    return
  with jax.numpy_rank_promotion("raise"):
    yield


@pytest.fixture(autouse=True)
def _fast_compiles():
  # Test shapes are tiny: XLA's optimisation passes cost far more than they save here.
  # Restored afterwards so other test directories are unaffected.
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
