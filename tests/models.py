"""Model helpers shared by tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.model import Decoder


def randomized_decoder(config, seed: int) -> Decoder:
  """A Decoder with every parameter perturbed (our init leaves norms at 1 and biases at 0),
  so weight round-trips and parity tests compare real numbers."""
  model = Decoder(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(var.get_value())
    var.set_value(jnp.asarray(value + rng.normal(0, 0.1, value.shape).astype(value.dtype)))
  return model
