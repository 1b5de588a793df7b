"""The core install (no extras) is enough to use LS-attention in one's own Flax model.

Builds the wheel, installs it into a fresh venv with its core dependencies only (pip takes them
from its cache, or from PyPI), checks that none of the extras' packages came along, and trains
a 2-layer Flax NNX model of its own that uses LS-attention through `make_attention_fn` inside
Flax's `nnx.MultiHeadAttention`.
"""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Packages of the extras that must not arrive with the core install.
NOT_IN_CORE = ("matplotlib", "math-verify", "sympy", "pyarrow", "torch", "grain", "tensorboardx",
               "sentencepiece", "gguf", "safetensors", "tokenizers", "ml-collections", "tqdm",
               "pebble", "jinja2", "transformers")

USER_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, optax
    from flax import nnx
    import ls_attention

    class Block(nnx.Module):
      def __init__(self, d, heads, rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, decode=False, rngs=rngs,
            attention_fn=ls_attention.make_attention_fn(num_local_heads=3, window=4))
        self.mlp = nnx.Linear(d, d, rngs=rngs)
      def __call__(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(jax.nn.gelu(x))

    class TinyLM(nnx.Module):
      def __init__(self, vocab, d, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, 4, rngs) for _ in range(2)])
        self.head = nnx.Linear(d, vocab, rngs=rngs)
      def __call__(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
          x = b(x)
        return self.head(x)

    model = TinyLM(32, 32, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    # a learnable sequence: each token is the previous one + 1 (mod 32)
    ids = (jnp.arange(33)[None, :] + jnp.arange(8)[:, None]) % 32

    @nnx.jit
    def step(model, opt, ids):
      def loss_fn(model):
        logits = model(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      opt.update(model, grads)
      return loss

    losses = [float(step(model, opt, ids)) for _ in range(60)]
    print("LOSSES", losses[0], losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses
""")


@pytest.mark.slow
def test_core_install_trains_own_flax_model_with_ls_attention(tmp_path):
  dist, venv = tmp_path / "dist", tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(dist), REPO], check=True, cwd=tmp_path)
  wheels = list(dist.glob("ls_softgrpo-*.whl"))
  assert len(wheels) == 1
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = str(venv / "bin" / "python")
  subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  str(wheels[0])], check=True, cwd=tmp_path, timeout=900)
  listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], check=True,
                          capture_output=True, text=True).stdout.lower()
  names = {l.split("==")[0].replace("_", "-") for l in listed.splitlines() if "==" in l}
  assert not names & set(NOT_IN_CORE), sorted(names & set(NOT_IN_CORE))
  script = tmp_path / "user_model.py"
  script.write_text(USER_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  out = subprocess.run([py, str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "LOSSES" in out.stdout
