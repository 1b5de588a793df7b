"""Pass@k with 95% bootstrap intervals, paired differences and plots for a reproduction folder.

  python -m experiments.passk_report runs/softgrpo_repro2      # -> report.md + PNGs there

Reads the folder written by experiments/repro/soft_grpo_passk.sh: `eval_*.json` from
experiments.eval_passk (each holds the [problem][sample] correctness matrix) and the training
runs' metrics.jsonl (`train_*/`). Policies are matched by file patterns (`--policies`,
"label=glob" pairs; several files of one label are its training seeds). Intervals resample
problems (soft_grpo.passk_stats); differences are paired over the same problems.

Writes report.md (the tables), passk_vs_k.png (unbiased Pass@k vs k, bands = 95% CI) and
training_curves.png (reward, KL, response length per step, one line per run).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from absl import flags

from experiments import cli

from common.train.metrics import read_metrics
from soft_grpo import passk_stats

FLAGS = flags.FLAGS

DEFAULT_POLICIES = ("base (discrete)=eval_base_discrete.json",
                    "base (soft_gumbel)=eval_base_soft_gumbel.json",
                    "GRPO=eval_grpo_s*.json",
                    "SofT-GRPO=eval_softgrpo_s*.json")
DEFAULT_DIFFS = ("SofT-GRPO-GRPO", "GRPO-base (discrete)", "SofT-GRPO-base (soft_gumbel)")
TABLE_KS = (1, 8, 32)


def define_flags():
  flags.DEFINE_list("policies", list(DEFAULT_POLICIES), "label=glob pairs (globs in the folder).")
  flags.DEFINE_list("diffs", list(DEFAULT_DIFFS), "Paired differences 'A-B' of policy labels.")
  flags.DEFINE_integer("resamples", 10_000, "Bootstrap resamples.")
  flags.DEFINE_string("train_glob", "train_*", "Training run folders (for the curves).")


def load_policies(folder: str, specs) -> dict[str, list[dict]]:
  """{label: [eval JSON, one per seed]}; labels whose files are missing are left out."""
  out = {}
  for spec in specs:
    label, sep, pattern = spec.partition("=")
    if not sep or not label or not pattern:
      raise ValueError(f"--policies entry {spec!r}; allowed: label=glob")
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    runs = []
    for path in files:
      with open(path) as f:
        res = json.load(f)
      if "correct" not in res:
        raise ValueError(f"{path}: no 'correct' matrix (written by an older eval_passk); rerun it")
      runs.append(dict(res, path=path))
    if runs:
      out[label] = runs
  if not out:
    raise ValueError(f"{folder}: no evaluation files match {list(specs)}")
  return out


def _scores(runs, k, estimator):
  return np.stack([passk_stats.per_problem_scores(r["correct"], k, estimator) for r in runs])


def _ks(policies) -> list[int]:
  n = min(len(r["correct"][0]) for runs in policies.values() for r in runs)
  return [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n]


def policy_table(policies, estimator: str, resamples: int) -> str:
  ks = [k for k in TABLE_KS if k in _ks(policies)]
  lines = ["| policy | eval mode | seeds | problems | " + " | ".join(
      f"Pass@{k}" + (" (mean@n)" if k == 1 and estimator == "unbiased" else "") for k in ks)
      + " | per seed Pass@1 / Pass@" + str(ks[-1]) + " |",
      "|---|---|---|---|" + "---|" * len(ks) + "---|"]
  for label, runs in policies.items():
    cells = []
    for k in ks:
      s = _scores(runs, k, estimator)
      cells.append(passk_stats.bootstrap_mean(s, num_resamples=resamples).fmt())
    per_seed = ", ".join(
        f"{100 * _scores([r], 1, estimator).mean():.1f} / {100 * _scores([r], ks[-1], estimator).mean():.1f}"
        for r in runs)
    lines.append(f"| {label} | {runs[0]['mode']} | {len(runs)} | {len(runs[0]['correct'])} | "
                 + " | ".join(cells) + f" | {per_seed} |")
  return "\n".join(lines)


def diff_table(policies, diffs, resamples: int) -> str:
  ks = [k for k in TABLE_KS if k in _ks(policies)]
  lines = ["| difference (points) | estimator | " + " | ".join(f"Pass@{k}" for k in ks) + " |",
           "|---|---|" + "---|" * len(ks)]
  for d in diffs:
    a, b = _split_diff(d, policies)
    if a is None:
      continue
    for est in passk_stats.ESTIMATORS:
      cells = [passk_stats.bootstrap_paired_difference(
          _scores(policies[a], k, est), _scores(policies[b], k, est),
          num_resamples=resamples).fmt() for k in ks]
      lines.append(f"| {a} − {b} | {est} | " + " | ".join(cells) + " |")
  if len(lines) == 2:
    return "(none: the policies of --diffs are not all evaluated yet)"
  return "\n".join(lines)


def _split_diff(text: str, policies):
  """'A-B' where labels may contain '-': the split whose both sides are known labels."""
  for i, ch in enumerate(text):
    if ch == "-" and text[:i] in policies and text[i + 1:] in policies:
      return text[:i], text[i + 1:]
  return None, None


def counts_table(policies) -> str:
  """How the per-problem correct counts spread: never / sometimes / always solved."""
  lines = ["| policy | seed file | never solved (0/n) | solved sometimes | always (n/n) | "
           "median correct/n |", "|---|---|---|---|---|---|"]
  for label, runs in policies.items():
    for r in runs:
      c = np.asarray(r["correct"]).sum(axis=1)
      n = len(r["correct"][0])
      lines.append(f"| {label} | {os.path.basename(r['path'])} | {(c == 0).sum()} | "
                   f"{((c > 0) & (c < n)).sum()} | {(c == n).sum()} | {int(np.median(c))}/{n} |")
  return "\n".join(lines)


def training_table(runs: dict[str, list[dict]]) -> str:
  lines = ["| run | steps | reward first 3 / last 3 steps | KL max | KL last | "
           "response length first / last | bad updates |", "|---|---|---|---|---|---|---|"]
  for name, recs in runs.items():
    r = [x["reward_mean"] for x in recs]
    kl = [x["kl"] for x in recs]
    ln = [x["response_length"] for x in recs]
    lines.append(f"| {name} | {len(recs)} | {np.mean(r[:3]):.3f} / {np.mean(r[-3:]):.3f} | "
                 f"{max(kl):.2e} | {kl[-1]:.2e} | {ln[0]:.1f} / {ln[-1]:.1f} | "
                 f"{sum(x.get('bad_updates', 0) for x in recs)} |")
  return "\n".join(lines)


def load_training(folder: str, pattern: str) -> dict[str, list[dict]]:
  out = {}
  for d in sorted(glob.glob(os.path.join(folder, pattern))):
    if os.path.isdir(d) and os.path.exists(os.path.join(d, "metrics.jsonl")):
      recs = [x for x in read_metrics(d, "train") if "reward_mean" in x]
      if recs:
        out[os.path.basename(d)] = recs
  return out


def plot_passk(policies, path: str, resamples: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ks = _ks(policies)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, est in zip(axes, passk_stats.ESTIMATORS):
    for label, runs in policies.items():
      ivs = [passk_stats.bootstrap_mean(_scores(runs, k, est), num_resamples=resamples)
             for k in ks]
      ax.plot(ks, [100 * i.mean for i in ivs], marker="o", label=f"{label} ({len(runs)} seed"
              f"{'s' if len(runs) > 1 else ''})")
      ax.fill_between(ks, [100 * i.low for i in ivs], [100 * i.high for i in ivs], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("Pass@k (%)")
    ax.set_title("unbiased Pass@k" if est == "unbiased" else "max over the first k (official)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8, loc="lower right")
  n_prob = len(next(iter(policies.values()))[0]["correct"])
  fig.suptitle(f"{n_prob} held-out problems; bands: 95% bootstrap CI over problems")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_training(runs: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = (("reward_mean", "mean reward (accuracy)"), ("kl", "KL to the reference (k3)"),
          ("response_length", "response length (tokens)"))
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, (key, title) in zip(axes, keys):
    for name, recs in runs.items():
      ax.plot([x["step"] for x in recs], [x[key] for x in recs], marker=".",
              ls="-" if "soft" in name else "--", label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(folder: str, *, policies=DEFAULT_POLICIES, diffs=DEFAULT_DIFFS,
           resamples: int = 10_000, train_glob: str = "train_*") -> str:
  """Writes report.md and the PNGs into `folder`; returns the markdown."""
  pol = load_policies(folder, policies)
  training = load_training(folder, train_glob)
  parts = [f"# Pass@k report: {folder}",
           "Values in %, brackets: 95% percentile-bootstrap CI over problems "
           f"({resamples} resamples; seeds averaged per problem first).",
           "## Unbiased Pass@k (1 − C(n−c,k)/C(n,k)); Pass@1 = mean@n",
           policy_table(pol, "unbiased", resamples),
           "## Official Pass@k (max over the first k samples)",
           policy_table(pol, "max_first_k", resamples),
           "## Paired differences (same problems, same evaluation seed)",
           diff_table(pol, diffs, resamples),
           "## Per-problem correct counts", counts_table(pol)]
  plot_passk(pol, os.path.join(folder, "passk_vs_k.png"), min(resamples, 2000))
  if training:
    parts += ["## Training", training_table(training)]
    plot_training(training, os.path.join(folder, "training_curves.png"))
  md = "\n\n".join(parts) + "\n"
  with open(os.path.join(folder, "report.md"), "w") as f:
    f.write(md)
  return md


def main(argv):
  if len(argv) != 2:
    raise ValueError("give one reproduction folder: python -m experiments.passk_report DIR")
  folder = argv[1]
  if not os.path.isdir(folder):
    raise ValueError(f"{folder}: not a folder")
  try:
    md = report(folder, policies=FLAGS.policies, diffs=FLAGS.diffs, resamples=FLAGS.resamples,
                train_glob=FLAGS.train_glob)
  except json.JSONDecodeError as e:
    raise ValueError(f"{folder}: an evaluation file is not valid JSON ({e.msg})") from None
  print(md)
  print(f"wrote {os.path.join(folder, 'report.md')} and its PNG plots")
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main, positional=True)
