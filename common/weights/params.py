"""Building a `Decoder` directly from a flat dict of arrays, without random init.

The model is traced abstractly (`nnx.eval_shape`, as big_vision/tunix do) so no throwaway
random weights are materialized; every parameter must then be supplied by name, with the
right shape, or the load fails with a one-line error.

Flat names are our NNX paths joined by '.', e.g. `layers.3.self_attn.q_proj.kernel`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import ModelConfig
from common.layers import dtype_of
from common.model import Decoder
from common.weights.errors import WeightLoadError


def _path_name(path) -> str:
  return ".".join(str(p) for p in path)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{flat name: shape} of every parameter the Decoder for `config` has."""
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  return {_path_name(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """`param_shapes(config)` without tracing every layer: one layer is traced and repeated.

  Cheap for any depth, so a checkpoint's tensor names and shapes can be checked against its
  config before a (possibly hostile, e.g. 5000-layer) model is built.
  """
  one = param_shapes(config.replace(num_layers=1))
  out = {k: v for k, v in one.items() if not k.startswith("layers.")}
  for i in range(config.num_layers):
    out.update({f"layers.{i}.{k[len('layers.0.'):]}": v for k, v in one.items()
                if k.startswith("layers.0.")})
  return out


def check_tensors(config: ModelConfig, shapes: dict[str, tuple[int, ...]], *,
                  source: str) -> None:
  """One-line WeightLoadError unless `shapes` ({our name: shape}) is exactly what `config` needs."""
  expected = expected_shapes(config)
  missing = sorted(set(expected) - set(shapes), key=_natural)
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise WeightLoadError(source, f"missing tensor(s) for {', '.join(missing[:3])}{more}; "
                          f"the config asks for {config.num_layers} layers, the weights hold "
                          f"{_num_layers(shapes)}")
  unexpected = sorted(set(shapes) - set(expected), key=_natural)
  if unexpected:
    more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise WeightLoadError(source, f"unexpected tensor(s) {', '.join(unexpected[:3])}{more}")
  for name, want in expected.items():
    if tuple(shapes[name]) != want:
      raise WeightLoadError(source, f"tensor for {name} has shape {tuple(shapes[name])}, "
                            f"the config implies {want}")


def _natural(name: str):
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _num_layers(shapes) -> int:
  layers = {n.split(".")[1] for n in shapes if n.startswith("layers.")}
  return len(layers)


def build_decoder(config: ModelConfig, params: dict[str, np.ndarray], *, source: str) -> Decoder:
  """A Decoder whose parameters are exactly `params` (cast to config.param_dtype).

  `source` (a file or directory) is named in errors about missing / misshaped tensors.
  """
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  pdt = dtype_of(config.param_dtype)
  expected = {_path_name(p) for p, _ in flat}
  missing = sorted(expected - set(params))
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise WeightLoadError(source, f"missing tensor(s) for {', '.join(missing[:3])}{more}")
  unexpected = sorted(set(params) - expected)
  if unexpected:
    raise WeightLoadError(source, f"unexpected tensor(s) {', '.join(unexpected[:3])}")
  leaves = []
  for path, var in flat:
    name = _path_name(path)
    arr = params[name]
    want = tuple(var.get_value().shape)
    if tuple(arr.shape) != want:
      raise WeightLoadError(source, f"tensor for {name} has shape {tuple(arr.shape)}, "
                            f"the config implies {want}")
    leaves.append((path, var.replace(jnp.asarray(arr, dtype=pdt))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def decoder_params(model: Decoder) -> dict[str, np.ndarray]:
  """The inverse of `build_decoder`: {flat name: numpy array}."""
  _, state = nnx.split(model)
  return {_path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
