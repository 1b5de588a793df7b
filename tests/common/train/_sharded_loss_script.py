"""Run in a subprocess with 8 simulated CPU devices (see test_train_sharding.py): trains two steps
of the test preset on a 2x4 data x fsdp mesh and on a 1-device mesh, prints both losses."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from common import sharding
from common.train import lm_step, train_state
from experiments import train_lm
from experiments.configs import ls_lm


def run(mesh, c, batches):
  mcfg = train_lm.model_config(c, 256)
  tx, sched = train_lm.build_optimizer(c)
  init = train_state.make_init_fn(mcfg, tx, c.seed)
  state, state_sh = sharding.create_sharded(init, mesh, min_size=c.fsdp_min_size)
  specs = {str(s.spec) for s in jax.tree.leaves(state_sh)}
  gd = train_state.model_graphdef(mcfg)
  bsh = {k: sharding.batch_sharding(mesh, 3, leading=1) for k in ("inputs", "targets")}
  step = lm_step.jit_train_step(lm_step.make_train_step(gd, tx, sched, train_lm.step_config(c)),
                                state_sh, bsh, mesh)
  losses, logits = [], []
  for b in batches:
    state, m = step(state, sharding.put_batch(b, mesh, leading=1))
    losses.append(float(m["loss"]))
    logits.append(np.asarray(m["max_logit_global"]).tolist())
  return losses, logits, sorted(specs)


def main():
  c = ls_lm.get_config("test")
  c.attention = sys.argv[1]
  c.stabilizer = "z_loss"
  c.fsdp_min_size = 64
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 256, (c.grad_accum, c.batch_size, c.seq_len + 1)).astype(np.int32)
  batches = [{"inputs": tok[..., :-1], "targets": tok[..., 1:]}] * 3
  assert jax.device_count() == 8
  mesh8 = sharding.make_mesh(2, 4)
  mesh1 = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  l8, g8, specs8 = run(mesh8, c, batches)
  l1, g1, _ = run(mesh1, c, batches)
  print(json.dumps({"loss8": l8, "loss1": l1, "logit8": g8, "logit1": g1, "specs8": specs8}))


if __name__ == "__main__":
  main()
