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

from benchmarks import common
from benchmarks.common import env_info, markdown_table, peak_rss_mb

VARIANTS = ("local", "minibatch_global", "full_global")


def run_one(
  variant: str,
  n: int,
  dataset: str,
  steps: int,
  arch: str,
  blur: float,
  scaling: float,
  prior_self_term: bool = False,
  ot_backend: str = "auto",
  ot_warm_iters: int = 0,
) -> dict:
  """Times ``steps`` warm steps of one variant in this process, then its parts apart.

  The parts (global variants; each jitted alone, median of 3 warm runs): ``encode_s``
  (all ``n`` images through the encoder), ``ot_s`` (value and gradient of the divergence
  between the ``n`` latents and an ``n``-point prior sample, with the step's backend) and
  ``encode_vjp_s`` (encoder forward plus the VJP of a latent cotangent into its parameters).
  With ``ot_warm_iters``, ``ot_s`` times the warm-started solve (from the cold solve's
  potentials, the prior's extended to a new sample) that every step after the first runs.
  """
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
    variant=variant,
    arch=arch,
    blur=blur,
    scaling=scaling,
    prior_self_term=prior_self_term,
    ot_backend=ot_backend,
    ot_warm_iters=ot_warm_iters,
  ).gsae()
  model = make_autoencoder(arch, 2)
  state = init_state(jax.random.key(0), model, config, images)
  step = make_train_step(model, config)
  key = jax.random.key(1)
  idx = lambda s: (jnp.arange(config.batch_size) + s * config.batch_size) % n
  t0 = time.perf_counter()
  state, out = step(state, images, idx(0), jax.random.fold_in(key, 0))
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    state, out = step(state, images, idx(s), jax.random.fold_in(key, s))
  jax.block_until_ready(out)
  per_step = (time.perf_counter() - t0) / steps
  peak_step = peak_rss_mb()  # before the parts, whose encoder VJP keeps all activations
  parts = _time_parts(model, config, state, images) if variant != "local" else {}
  return {
    **parts,
    "ot_backend": ot_backend,
    "ot_warm_iters": ot_warm_iters,
    "variant": variant,
    "n": n,
    "arch": arch,
    "dataset": dataset,
    "blur": blur,
    "scaling": scaling,
    "prior_self_term": prior_self_term,
    "status": "ok",
    "compile_and_first_step_s": first,
    "step_s": per_step,
    "steps_per_s": 1 / per_step,
    "peak_rss_mb": peak_step,
    "peak_rss_with_parts_mb": peak_rss_mb(),
    "rss_after_imports_mb": base,
    "loss": float(out["loss"]),
  }


def _time_parts(model, config, state, images) -> dict:
  import jax
  import jax.numpy as jnp

  from gsae_jax import priors
  from gsae_jax.ot import solve_divergence
  from gsae_jax.training.gsae import encode_all

  enc = state.params["encoder"]
  encode = jax.jit(lambda p: encode_all(model, p, images, config.encode_chunk))
  z = encode(enc)
  prior = priors.get_prior(config.prior, dim=z.shape[1])(jax.random.key(2), z.shape[0])

  def ot_loss(z, init=None):
    out = solve_divergence(
      z,
      prior,
      blur=config.blur,
      scaling=config.scaling,
      static_b=not config.prior_self_term,
      backend=config.ot_backend,
      init=init,
      warm_iters=max(1, config.ot_warm_iters),
    )
    return out.value, out

  ot = jax.jit(jax.value_and_grad(ot_loss, has_aux=True))
  if config.ot_warm_iters:
    (_, cold), _ = ot(z)
    init = (cold.f_ba, None, cold.f_aa, None)
    ot = jax.jit(jax.value_and_grad(lambda z: ot_loss(z, init), has_aux=True))
  w = jnp.ones_like(z)
  enc_vjp = jax.jit(lambda p: jax.vjp(lambda q: encode_all(model, q, images, 500), p)[1](w))

  def median_s(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    return sorted(times)[1]

  (_, out), _ = ot(z)
  return {
    "encode_s": median_s(encode, enc),
    "ot_s": median_s(ot, z),
    "encode_vjp_s": median_s(enc_vjp, enc),
    "ot_backend_used": out.backend,
    "ot_dense_fallbacks": int(out.dense_fallbacks),
    "ot_kept_tile_fraction": float(out.kept_tile_fraction),
  }


def run_subprocess(cmd: list[str], timeout_s: float | None) -> tuple[dict | None, float | None]:
  """Runs ``cmd`` (a ``--one`` config), polling its peak RSS; kills it after ``timeout_s``.

  Returns:
    ``(row, peak_mb)``: the JSON row it printed (``None`` on timeout) and the last VmHWM seen.
  """
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0, peak = time.time(), None
  while proc.poll() is None:
    peak = common.vm_hwm_mb(proc.pid) or peak
    if timeout_s is not None and time.time() - t0 > timeout_s:
      proc.kill()
      proc.communicate()
      return None, peak
    time.sleep(1.0)
  out, err = proc.communicate()
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
  return json.loads(out.strip().splitlines()[-1]), peak


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
  p.add_argument(
    "--prior_self_term",
    action="store_true",
    help="also compute the prior's self-term of S (GSAEConfig.prior_self_term)",
  )
  p.add_argument("--ot_backend", default="auto", choices=("auto", "dense", "multiscale"))
  p.add_argument(
    "--ot_warm_iters",
    type=int,
    default=0,
    help="GSAEConfig.ot_warm_iters: warm-started OT with this many updates per step",
  )
  p.add_argument(
    "--timeout_s",
    type=float,
    default=None,
    help="kill a config after this long and record its peak RSS so far as 'timeout'",
  )
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--name", default="train_step", help="output file stem")
  p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
  args = p.parse_args(argv)
  if args.one:
    variant, n, dataset = args.one.split(",", 2)
    row = run_one(
      variant,
      int(n),
      dataset,
      args.steps,
      args.arch,
      args.blur,
      args.scaling,
      args.prior_self_term,
      args.ot_backend,
      args.ot_warm_iters,
    )
    print(json.dumps(row))
    return
  env = env_info()
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
        f"--blur={args.blur}",
        f"--scaling={args.scaling}",
        f"--ot_backend={args.ot_backend}",
        f"--ot_warm_iters={args.ot_warm_iters}",
      ] + (["--prior_self_term"] if args.prior_self_term else [])
      row, peak = run_subprocess(cmd, args.timeout_s)
      if row is None:
        row = {
          "variant": v,
          "n": n,
          "arch": args.arch,
          "dataset": dataset,
          "blur": args.blur,
          "scaling": args.scaling,
          "prior_self_term": args.prior_self_term,
          "status": f"timeout after {args.timeout_s:g} s (compile + first step unfinished)",
          "peak_rss_mb": peak,
        }
      rows.append(row)
      rate = row.get("steps_per_s")
      print(
        f"{v} n={n}: {row['status']}, "
        + (f"{rate:.3f} steps/s, " if rate else "")
        + f"peak RSS {row['peak_rss_mb'] or float('nan'):.0f} MB",
        file=sys.stderr,
        flush=True,
      )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"env": env, "args": vars(args), "rows": rows}
  (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
  cols = [
    "steps_per_s",
    "step_s",
    "encode_s",
    "ot_s",
    "encode_vjp_s",
    "compile_and_first_step_s",
    "peak_rss_mb",
  ]
  fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)
  table = markdown_table(
    [
      "variant",
      "n",
      "arch",
      "blur/scaling",
      "OT backend",
      "steps/s",
      "s/step",
      "encode (s)",
      "OT value+grad (s)",
      "encode+VJP (s)",
      "compile+first (s)",
      "peak RSS (MB)",
      "status",
    ],
    [
      [r["variant"], r["n"], r["arch"], f"{r['blur']:g}/{r['scaling']:g}"]
      + [r.get("ot_backend_used", r.get("ot_backend", "–"))]
      + [fmt(r.get(c)) for c in cols]
      + [r["status"]]
      for r in rows
    ],
  )
  note = (
    f"load average at start {env['load_avg_1m_at_start']:.2f}; "
    f"prior_self_term={args.prior_self_term}; ot_warm_iters={args.ot_warm_iters}; "
    f"{args.steps} timed steps after the first"
  )
  (out / f"{args.name}.md").write_text(table + "\n\n" + note + "\n")
  print(table)
  print(note)


if __name__ == "__main__":
  main()
