"""Export a trained model: an HF checkpoint where HF has the architecture, else this package's
own format (safetensors + ls_softgrpo_model.json + README.txt saying what it is).

  python -m experiments.export --model=runs/x                 # newest checkpoint -> runs/x/export/step_N
  python -m experiments.export --model=runs/x --step=80 --out=/tmp/m --dtype=bfloat16
  python -m experiments.export --model=runs/grpo --format=hf  # refuses, naming the feature, if HF can't

`--model` is anything `common.load_pretrained` reads: a train_lm / soft_grpo run folder, an
HF checkpoint dir, a .gguf file or an embedded name. Llama/Qwen2-shaped models (RoPE, dense
attention, no QK-norm or soft-cap) become HF checkpoints that `transformers` loads; LS-attention
or learned-position models cannot be run by transformers and are written in the native format.
The library part is `common.weights.export.export_pretrained`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a script, so importing this module (tests, other entry points)
  never collides with other modules' flags (e.g. plot_runs' --out)."""
  flags.DEFINE_string("model", None, "Run folder, HF checkpoint dir, .gguf file or embedded "
                      "name.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a run folder (default: the newest).")
  flags.DEFINE_string("out", None, "Output folder (default for a run folder: "
                      "<run>/export/step_N).")
  flags.DEFINE_enum("format", "auto", ["auto", "hf", "native"],
                    "auto: HF when HF has the architecture, else native.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Stored weight dtype.")


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  return export(FLAGS.model, FLAGS.out, step=FLAGS.step, format=FLAGS.format,
                dtype=FLAGS.dtype)


def export(model: str | None, out: str | None = None, *, step: int | None = None,
           format: str = "auto", dtype: str = "float32") -> int:
  """The command: exports, prints what was written (or one error line); the exit code."""
  if not model:
    print("error: --model is required (a run folder, HF dir, .gguf file or embedded name)",
          file=sys.stderr)
    return 2
  import ls_attention  # noqa: F401  (registers attention="ls" for LS-attention runs)
  from common.weights.export import export_pretrained

  try:
    path, kind = export_pretrained(model, out, step=step, format=format, dtype=dtype)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  if kind == "hf":
    print(f"wrote an HF checkpoint to {path} (transformers: "
          f"AutoModelForCausalLM.from_pretrained({path!r}))")
  else:
    print(f"wrote a native (non-HF) export to {path}; HF transformers cannot run this model, "
          f"see {path}/README.txt; load it with common.load_pretrained({path!r})")
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
