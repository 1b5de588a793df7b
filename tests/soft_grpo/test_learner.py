"""The GRPO / SofT-GRPO loop on a tiny random model: end to end, resume, 8-device sharding,
and `train(config, workdir)` through a config dict."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from common.config import tiny_config
from common.model import Decoder
from common.tokenizer import ByteTokenizer
from common.train.checkpoint import Checkpointer, abstract_like
from experiments.configs.soft_grpo import get_config
from soft_grpo import learner as learner_lib
from soft_grpo.config import Config, GRPOConfig, OptimConfig
from soft_grpo.learner import Learner, problems_for_step
from soft_grpo.prompts import think_end_ids
from soft_grpo.rollout import RolloutConfig
from soft_grpo.tasks import TaskConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBLEMS = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(4) for b in range(4)]


def reward_fn(texts, golds):
  # A dense toy reward (share of digits in the response) so groups have non-zero advantages.
  return np.array([sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts],
                  np.float32), {"n": len(texts)}


def make(mode, mesh=None, lr=1e-3, noise_factor=1.0, mini_batch_prompts=2):
  tok = ByteTokenizer()
  model = Decoder(tiny_config(vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rc = RolloutConfig(mode=mode, max_new_tokens=12, think_budget=3, top_k=4,
                     noise_factor=noise_factor,
                     think_end_ids=think_end_ids(tok), eos_ids=tok.eos_ids)
  cfg = Config(rollout=rc, grpo=GRPOConfig(group_size=4, prompts_per_step=4,
                                           mini_batch_prompts=mini_batch_prompts,
                                           max_prompt_len=8),
               optim=OptimConfig(learning_rate=lr), task=TaskConfig(prompt="bare"))
  tr = Learner(graphdef, cfg, tok, PROBLEMS, reward_fn, mesh=mesh)
  return tr, nnx.to_pure_dict(state)


@pytest.mark.parametrize("mode", ["soft_gumbel", "discrete"])
def test_training_steps_change_params_and_report_metrics(mode, tmp_path):
  tr, params = make(mode)
  state = tr.init_state(params)
  p0 = jax.tree.map(np.asarray, state.params)
  history = []
  for _ in range(2):
    state, m = tr.train_step(state)
    history.append(m)
  assert int(state.step) == 2
  delta = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, p0)))
  assert delta > 1e-5
  ref_delta = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.ref_params, p0)))
  assert ref_delta == 0.0                       # the reference stays frozen
  for m in history:
    for key in ("reward_mean", "accuracy", "response_length", "think_length",
                "clip_fraction", "kl", "grad_norm", "tokens_per_s"):
      assert np.isfinite(m[key]), key
    assert 0 < m["response_length"] <= 12 and m["think_length"] <= 3 + 8   # budget + "</think>"
    assert m["grad_norm"] > 0
  assert history[0]["data_position"] == 4 and history[1]["data_position"] == 8
  # Second step: the policy moved away from the reference, so the k3 KL is positive.
  assert history[1]["kl"] > 0

  # Resume: checkpoint after step 2, run step 3 twice (continued and restored): identical.
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(2, state, extras={"data_position": 8})
  cont, m_cont = tr.train_step(jax.tree.map(lambda x: x.copy(), state))
  tr2, params2 = make(mode)
  fresh = tr2.init_state(params2)
  step, restored, extras = ckpt.restore_latest(abstract_like(fresh))
  assert step == 2 and extras["data_position"] == 8
  again, m_again = tr2.train_step(restored)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(cont.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("reward_mean", "kl", "grad_norm", "response_length"):
    assert m_cont[key] == m_again[key], key


@pytest.mark.parametrize("mode,mini_batch_prompts", [("soft_gumbel", 2), ("discrete", 4)])
def test_first_update_reuses_the_current_log_probs(mode, mini_batch_prompts):
  """Issue 13: the first mini-batch of a one-epoch step gets no separate old-log-prob forward
  (pi_old = stop_gradient(pi_theta)); the step's losses and gradients equal the scored ones."""
  metrics, jits = [], []
  for reuse in (True, False):
    tr, params = make(mode, mini_batch_prompts=mini_batch_prompts)
    tr.old_logp_is_current = lambda reuse=reuse: reuse
    state, m = tr.train_step(tr.init_state(params))
    metrics.append(m)
    jits.append({k[0] if isinstance(k, tuple) else k for k in tr._jits})
  for key in ("loss", "pg_loss", "kl", "grad_norm", "clip_fraction", "reward_mean"):
    np.testing.assert_allclose(metrics[0][key], metrics[1][key], rtol=2e-4, atol=1e-7,
                               err_msg=key)
  if mini_batch_prompts == 2:     # the second mini-batch's rows are scored, the first's not
    assert "score_from" in jits[0] and "score_from" not in jits[1]
  else:                           # one mini-batch: no old-log-prob forward at all
    assert "score_from" not in jits[0]


def test_data_order_is_a_function_of_step():
  a = problems_for_step(10, 3, 4, seed=1)
  assert a == problems_for_step(10, 3, 4, seed=1)
  seen = [i for s in range(5) for i in problems_for_step(10, s, 4, seed=1)]
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
    import jax, numpy as np
    from jax.sharding import Mesh
    from test_learner import make
    assert jax.device_count() == 8
    results = []
    for mesh in (Mesh(np.array(jax.devices()[:1]), ("data",)),
                 Mesh(np.array(jax.devices()), ("data",)),
                 Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))):
      # Adam turns float-noise-sized gradients into +-lr steps, so a small lr bounds the
      # parameter difference that reduction order alone can cause.
      # noise_factor 0.5 keeps g' = y' - lp off the clip edges [-1.5, 3]: at an edge, float
      # rounding (which differs with the reduction order) decides whether gradient flows.
      tr, params = make("soft_gumbel", mesh=mesh, lr=1e-6, noise_factor=0.5)
      state = tr.init_state(params)
      for _ in range(2):
        state, m = tr.train_step(state)
      results.append((jax.tree.map(np.asarray, state.params), m))
    (p1, m1) = results[0]
    for p8, m8 in results[1:]:   # data-parallel 8, and data 4 x fsdp 2
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=0)
      for k in ("reward_mean", "response_length", "think_length"):
        assert m1[k] == m8[k], (k, m1[k], m8[k])
      np.testing.assert_allclose(m1["kl"], m8["kl"], rtol=1e-3, atol=1e-7)
      for k in ("grad_norm", "loss", "pg_loss"):
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-7, err_msg=k)
    print("SHARDED_OK", m1["reward_mean"], m1["kl"])
""")


def test_sharded_training_on_8_devices_equals_1_device():
  """Data-parallel over 8 simulated devices, and data x FSDP (4 x 2), match 1 device."""
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SHARDED.format(root=ROOT, here=here)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]


def test_train_resume_continues_identically(tmp_path):
  c = get_config("test")
  c.run.num_steps = 2
  full, hist_full = learner_lib.train(c, str(tmp_path / "a"), log_fn=lambda *_: None)
  c1 = get_config("test")
  c1.run.num_steps = 1
  learner_lib.train(c1, str(tmp_path / "b"), log_fn=lambda *_: None)
  logs = []
  resumed, hist_res = learner_lib.train(c, str(tmp_path / "b"), log_fn=logs.append)
  assert logs and "resumed from step 1" in logs[0]
  assert [h["step"] for h in hist_res] == [2]
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("reward_mean", "kl", "grad_norm", "response_length", "data_position"):
    assert hist_full[-1][key] == hist_res[-1][key], key
  recs = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["step"] for r in recs] == [1, 2]
  assert os.path.isdir(tmp_path / "b" / "tb")
  # config.json keeps the run's original config; the longer run is recorded as a change.
  stored = json.load(open(tmp_path / "b" / "config.json"))
  assert stored["config"]["run"]["num_steps"] == 1
  assert stored["config"]["rollout"]["mode"] == "soft_gumbel"
  assert stored["model"]["name"] == "tiny" and stored["model_config"]["vocab_size"] == 258
  hist = [json.loads(l) for l in open(tmp_path / "b" / "config_history.jsonl")]
  assert hist[0]["step"] == 1 and hist[0]["changes"] == {"run.num_steps": [1, 2]}


def test_periodic_eval_and_library_evaluate(tmp_path):
  c = get_config("test")
  c.run.num_steps, c.run.eval_every = 1, 1
  _, hist = learner_lib.train(c, str(tmp_path / "e"), log_fn=lambda *_: None)
  assert 0.0 <= hist[0]["eval_accuracy"] <= hist[0]["eval_pass@n"] <= 1.0
  correct = learner_lib.evaluate(get_config("test"), 2, 3, seed=0, rows_per_call=4)
  assert correct.shape == (3, 2) and set(np.unique(correct)) <= {0.0, 1.0}
  with pytest.raises(ValueError, match=r"num_problems=99; allowed: \[1, 8\]"):
    learner_lib.evaluate(get_config("test"), 2, 99)


def test_prompt_longer_than_max_prompt_len_is_a_one_line_error():
  tr, params = make("discrete")
  with pytest.raises(ValueError, match=r"^grpo\.max_prompt_len: 8 is shorter than the "
                     r"13-token prompt"):
    tr.generate(params, [{"problem": "123456789+12", "answer": "x"}], 4, jax.random.key(0))


def test_prompt_length_buckets_pad_to_the_longest_rounded_up():
  g = GRPOConfig(group_size=2, prompts_per_step=2, mini_batch_prompts=1, max_prompt_len=20,
                 prompt_len_bucket=8)
  assert [g.prompt_width(n) for n in (1, 8, 9, 17, 20)] == [8, 8, 16, 20, 20]
  assert dataclasses.replace(g, prompt_len_bucket=0).prompt_width(3) == 20
  with pytest.raises(ValueError, match=r"^grpo\.prompt_len_bucket: got -1"):
    dataclasses.replace(g, prompt_len_bucket=-1)
  tr, params = make("discrete")
  tr.cfg = dataclasses.replace(tr.cfg, grpo=dataclasses.replace(
      tr.cfg.grpo, max_prompt_len=12, prompt_len_bucket=2))
  problems = [{"problem": "1+2", "answer": "3"}, {"problem": "10+2", "answer": "12"}]
  lens = [len(tr.prompt_ids(p["problem"])) for p in problems]   # 4 and 5 tokens
  assert lens[1] == lens[0] + 1 and lens[1] % 2 == 1 and lens[1] < 11
  out, texts, _ = tr.generate(params, problems, 4, jax.random.key(0))
  width = lens[1] + 1                                  # the longest, rounded up to even
  assert out.prompt_BxP.shape[1] == width
  np.testing.assert_array_equal(np.asarray(out.start_B),
                                [width - lens[0]] * 4 + [width - lens[1]] * 4)
  assert len(texts) == 8


def test_evaluate_samples_soft_modes_at_eval_tau():
  """Issue 11 item 3: evaluation uses tau = run.eval_tau (0.5, official inference), not the
  training tau (0.1)."""
  tr, params = make("soft_gumbel")
  assert tr.cfg.run.eval_tau == 0.5 and tr.cfg.rollout.tau == 0.1
  key = jax.random.key(5)
  got = tr.evaluate(params, PROBLEMS[:2], 4, key, rows_per_call=8)
  sub = jax.random.split(key)[1]
  texts = {}
  for tau in (0.5, 0.1):
    rc = dataclasses.replace(tr.cfg.rollout, tau=tau)
    out, full, _ = tr.generate(params, PROBLEMS[:2], 4, sub, rcfg=rc)
    texts[tau] = (full, np.asarray(out.y_BxNxK))
    if tau == 0.5:
      np.testing.assert_array_equal(got, tr.rewards(PROBLEMS[:2], full, 4)[0].reshape(2, 4))
  # tau changes the fed mixtures, hence the trajectories.
  assert texts[0.5][0] != texts[0.1][0] or not np.array_equal(texts[0.5][1], texts[0.1][1])


def _quiet(c):
  c.run.num_steps = 1
  return c


def test_blown_up_updates_are_skipped_and_never_checkpointed(tmp_path, capsys):
  """Issue 12 row 1: lr 1e3 gives absurd updates; the guard skips them (naming the
  parameter-norm jump), the parameters stay those of step 0 and no checkpoint is written."""
  c = _quiet(get_config("test"))
  c.optim.learning_rate = 1e3
  c.run.num_steps = 2
  state, hist = learner_lib.train(c, str(tmp_path / "hot"), log_fn=lambda *_: None)
  assert "parameter norm jump" in capsys.readouterr().err
  assert [h["bad_updates"] for h in hist] == [2, 2] and hist[-1]["num_nonfinite"] == 4
  ckpt = Checkpointer(str(tmp_path / "hot" / "checkpoints"))
  assert ckpt.all_steps() == []
  ckpt.close()
  run = learner_lib.build(c)
  learner_lib._close(run.learner)
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.run.nonfinite = "stop"
  with pytest.raises(learner_lib.guard_lib.BadUpdate,
                     match=r"step 1: parameter norm jump .*stopping \(nonfinite='stop'\)"):
    learner_lib.train(c, str(tmp_path / "hot2"), log_fn=lambda *_: None)
  c.run.nonfinite = "skip"
  c.run.max_bad_streak = 1
  with pytest.raises(learner_lib.guard_lib.BadUpdate, match="1 bad updates in a row"):
    learner_lib.train(c, str(tmp_path / "hot3"), log_fn=lambda *_: None)


def test_nonfinite_loss_is_skipped_in_update_step():
  """A NaN advantage makes the loss non-finite: update_step keeps params and optimizer state."""
  tr, params = make("discrete")
  state = tr.init_state(params)
  p0 = jax.tree.map(np.asarray, state.params)
  out, _, _ = tr.generate(state.params, PROBLEMS[:2], 2, jax.random.key(0))
  logp = tr._score_jit(state.params, out)(state.params, out)
  batch = {"rollout": out, "advantages_B": np.full((4,), np.nan, np.float32),
           "old_logp_BxN": logp, "ref_logp_BxN": logp}
  import functools
  from soft_grpo import algorithm
  new, m = jax.jit(functools.partial(algorithm.update_step, graphdef=tr.graphdef,
                                     cfg=tr.cfg))(state, batch)
  assert not bool(m["finite"]) and int(m["bad_reason"]) in (1, 2)
  assert int(new.num_nonfinite) == 1
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_config_rejects_bad_learning_rate_and_guard_settings():
  for lr in (float("nan"), float("inf"), 0.0, -1e-3):
    with pytest.raises(ValueError, match="optim.learning_rate: got"):
      OptimConfig(learning_rate=lr)
  c = get_config("test")
  c.run.nonfinite = "ignore"
  with pytest.raises(ValueError, match="run.nonfinite: 'ignore'; allowed: skip, stop"):
    Config.from_config_dict(c)
  c = get_config("test")
  c.run.max_param_norm_ratio = float("nan")
  with pytest.raises(ValueError, match="run.max_param_norm_ratio"):
    Config.from_config_dict(c)


def test_busy_workdir_is_refused(tmp_path):
  """Issue 12 row 3: a second run on a busy workdir is refused at once, naming the holder."""
  import time
  from common.train.workdir import WorkdirError, WorkdirLock
  d = tmp_path / "busy"
  d.mkdir()
  with WorkdirLock(str(d)):
    t0 = time.perf_counter()
    with pytest.raises(WorkdirError, match=f"in use by another run .*pid {os.getpid()}"):
      learner_lib.train(_quiet(get_config("test")), str(d), log_fn=lambda *_: None)
    assert time.perf_counter() - t0 < 10
  assert not (d / "metrics.jsonl").exists() and not (d / "config.json").exists()


def test_config_change_on_resume(tmp_path):
  """Issue 12 row 4: a resume with another lr/seed is refused naming old/new values, or
  recorded with its step under allow_config_change; config.json is never rewritten."""
  d = str(tmp_path / "run")
  c = _quiet(get_config("test"))
  learner_lib.train(c, d, log_fn=lambda *_: None)
  before = open(os.path.join(d, "config.json")).read()
  c2 = get_config("test")
  c2.run.num_steps = 2
  c2.optim.learning_rate = 0.5
  c2.seed = 7
  with pytest.raises(ValueError, match=r"optim.learning_rate: 0.001 -> 0.5; seed: 0 -> 7"):
    learner_lib.train(c2, d, log_fn=lambda *_: None)
  recs = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
  assert [r["step"] for r in recs] == [1]     # the refused resume trained nothing
  _, hist = learner_lib.train(c2, d, log_fn=lambda *_: None, allow_config_change=True)
  assert [h["step"] for h in hist] == [2]
  assert open(os.path.join(d, "config.json")).read() == before
  changes = [json.loads(l) for l in open(os.path.join(d, "config_history.jsonl"))]
  assert changes[-1]["step"] == 1
  assert changes[-1]["changes"]["optim.learning_rate"] == [0.001, 0.5]
  assert changes[-1]["changes"]["seed"] == [0, 7]


def test_model_remat_reaches_the_update_with_the_same_loss_and_gradients():
  """Issue 15: remat is selectable for the GRPO update; it changes memory, not the math."""
  import jax
  import numpy as np
  from soft_grpo.config import ModelSpec
  from soft_grpo.learner import load_model
  gd0, p0, _, c0 = load_model(ModelSpec(name="tiny"), 0)
  gd1, p1, _, c1 = load_model(ModelSpec(name="tiny", remat="full"), 0)
  assert c0.remat == "none" and c1.remat == "full"
  from flax import nnx
  ids = np.arange(24, dtype=np.int32).reshape(2, 12) % 200 + 3
  def loss(gd, p):
    logits, _ = nnx.merge(gd, p)(ids)
    return jax.numpy.mean(logits ** 2)
  l0, g0 = jax.value_and_grad(loss, argnums=1)(gd0, p0)
  l1, g1 = jax.value_and_grad(loss, argnums=1)(gd1, p1)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
