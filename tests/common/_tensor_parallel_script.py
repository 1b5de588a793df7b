"""Run with 8 simulated CPU devices (test_tensor_parallel.py): the decoder's logits, the LM loss,
its gradients and one AdamW update on a 2x2x2 data x fsdp x tensor mesh vs on one device."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from common import losses, sharding
from common.config import tiny_config
from common.model import Decoder


def main():
  attention = sys.argv[1] if len(sys.argv) > 1 else "mhsa"
  extra = {}
  if attention == "ls":
    import ls_attention  # noqa: F401  (registers attention="ls")
    extra = dict(attention="ls", num_local_heads=2, window=4)
  cfg = tiny_config(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    mlp_dim=128, tie_word_embeddings=False, **extra)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
  # SGD with momentum: the update is linear in the gradient, so it shows the sharded gradient
  # itself. (Adam's first step is ~lr * sign(g): entries with |g| near eps flip on float noise
  # whatever the mesh, which says nothing about the sharding.)
  tx = optax.sgd(0.1, momentum=0.9)

  def loss_fn(p, b):
    logits, _ = nnx.merge(graphdef, p)(b["inputs"])
    return losses.cross_entropy(logits, b["targets"]), logits

  def step(p, opt, b):
    (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), logits, loss, g

  results = {}
  for name, mesh in (("one", jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                                            axis_types=(jax.sharding.AxisType.Auto,) * 3,
                                            devices=jax.devices()[:1])),
                     ("tp", sharding.make_mesh(2, 2, 2))):
    p_sh = sharding.param_shardings(params, mesh, min_size=0)
    p = jax.device_put(params, p_sh)
    opt = jax.jit(tx.init, out_shardings=sharding.param_shardings(
        jax.eval_shape(tx.init, params), mesh, min_size=0))(p)
    b = sharding.put_batch(batch, mesh)
    new_p, logits, loss, grads = jax.jit(step)(p, opt, b)
    results[name] = dict(logits=np.asarray(logits), loss=float(loss),
                         new_p=jax.tree.map(np.asarray, new_p), grads=jax.tree.map(np.asarray, grads),
                         specs={sharding.path_str(k): str(s.spec) for k, s in
                                jax.tree_util.tree_flatten_with_path(p_sh)[0]})
  # Greedy decoding with the sampler on the tensor-parallel mesh: the same tokens.
  from common.sampler import SamplingConfig, generate
  prompts = [list(tok[i, :5 + i]) for i in range(4)]
  scfg = SamplingConfig(max_new_tokens=8, greedy=True)
  ref_tokens = np.asarray(generate(model, prompts, scfg).tokens_BxN)
  tp_tokens = np.asarray(generate(model, prompts, scfg, mesh=sharding.make_mesh(2, 2, 2)).tokens_BxN)
  one, tp = results["one"], results["tp"]
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
  out = {
      "logits_rel": rel(tp["logits"], one["logits"]),
      "loss_rel": abs(tp["loss"] - one["loss"]) / abs(one["loss"]),
      "grads_rel": max(rel(a, b) for a, b in zip(jax.tree.leaves(tp["grads"]),
                                                 jax.tree.leaves(one["grads"]))),
      "update_rel": max(rel(a, b) for a, b in zip(jax.tree.leaves(tp["new_p"]),
                                                  jax.tree.leaves(one["new_p"]))),
      "specs": tp["specs"],
      "greedy_equal": bool(np.array_equal(ref_tokens, tp_tokens)),
  }
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
