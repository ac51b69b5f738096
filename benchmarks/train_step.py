"""Steps per second and peak memory of the three GSAE training steps.

  python -m benchmarks.train_step --n 4000 60000 --dataset idx:/usr/share/datasets/fashion-mnist

Each (variant, n) runs in a fresh subprocess so its peak RSS is its own; the step is the jitted
training step of :mod:`gsae_jax.training.gsae` on the MLP, batch 100, flower prior, blur 0.05,
scaling 0.7. Writes ``train_step.json`` and ``train_step.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import env_info, markdown_table, peak_rss_mb

VARIANTS = ("local", "minibatch_global", "full_global")


def run_one(
  variant: str, n: int, dataset: str, steps: int, arch: str, blur: float, scaling: float
) -> dict:
  """Times ``steps`` warm steps of one variant in this process."""
  import jax
  import jax.numpy as jnp

  from gsae_jax.data import load_dataset
  from gsae_jax.models import make_autoencoder
  from gsae_jax.training.gsae import GSAEConfig, init_state, make_train_step
  from gsae_jax.training.loop import ExperimentConfig

  base = peak_rss_mb()
  data = load_dataset(dataset, n_train=n, n_test=None if dataset == "mnist5k" else 1000)
  images = jnp.asarray(data.train_images)
  n = images.shape[0]
  config: GSAEConfig = ExperimentConfig(
    variant=variant, arch=arch, blur=blur, scaling=scaling
  ).gsae()
  model = make_autoencoder(arch, 2)
  state = init_state(jax.random.key(0), model, config, images)
  step = make_train_step(model, config, images)
  key = jax.random.key(1)
  idx = lambda s: (jnp.arange(config.batch_size) + s * config.batch_size) % n
  t0 = time.perf_counter()
  state, out = step(state, idx(0), jax.random.fold_in(key, 0))
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    state, out = step(state, idx(s), jax.random.fold_in(key, s))
  jax.block_until_ready(out)
  per_step = (time.perf_counter() - t0) / steps
  return {
    "variant": variant,
    "n": n,
    "arch": arch,
    "dataset": dataset,
    "compile_and_first_step_s": first,
    "step_s": per_step,
    "steps_per_s": 1 / per_step,
    "peak_rss_mb": peak_rss_mb(),
    "rss_after_imports_mb": base,
    "loss": float(out["loss"]),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, nargs="+", default=[4000])
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  p.add_argument("--dataset", default="mnist5k", help="data source for n > 4000")
  p.add_argument("--arch", default="mlp")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--blur", type=float, default=0.05)
  p.add_argument(
    "--scaling",
    type=float,
    default=0.7,
    help="a short schedule (e.g. --blur 2 --scaling 0.3) measures peak memory fast",
  )
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
  args = p.parse_args(argv)
  if args.one:
    variant, n, dataset = args.one.split(",", 2)
    print(
      json.dumps(run_one(variant, int(n), dataset, args.steps, args.arch, args.blur, args.scaling))
    )
    return
  rows = []
  for n in args.n:
    dataset = "mnist5k" if n <= 4000 else args.dataset
    for v in args.variants:
      cmd = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        f"--one={v},{n},{dataset}",
        f"--steps={args.steps}",
        f"--arch={args.arch}",
      ]
      res = subprocess.run(cmd, capture_output=True, text=True)
      if res.returncode != 0:
        raise RuntimeError(f"{v} n={n} failed:\n{res.stderr[-3000:]}")
      rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
      print(
        f"{v} n={n}: {rows[-1]['steps_per_s']:.3f} steps/s, "
        f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
        flush=True,
      )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "train_step.json").write_text(json.dumps({"env": env_info(), "rows": rows}, indent=2))
  table = markdown_table(
    ["variant", "n", "arch", "steps/s", "s/step", "compile+first (s)", "peak RSS (MB)"],
    [
      [
        r["variant"],
        r["n"],
        r["arch"],
        r["steps_per_s"],
        r["step_s"],
        r["compile_and_first_step_s"],
        r["peak_rss_mb"],
      ]
      for r in rows
    ],
  )
  (out / "train_step.md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
