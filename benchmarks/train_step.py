"""Steps per second and peak memory of the three GSAE training steps (MLP, batch 100, flower
prior), each (variant, n) in a fresh subprocess (its own peak RSS).

  python -m benchmarks.train_step --n 4000 60000 --dataset idx:/usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

from benchmarks import harness

VARIANTS = ("local", "minibatch_global", "full_global")
CONFIG = (
  "arch blur scaling prior_self_term ot_backend ot_coarse ot_warm_iters resample_freq".split()
)
"""The flags passed on to :class:`gsae_jax.training.loop.ExperimentConfig` (and into each row)."""


def measure(variant: str, n: int, dataset: str, steps: int, pretrain: int = 0, **config) -> dict:
  """Times ``steps`` warm steps of one variant (``config``: the :data:`CONFIG` settings) in this
  process, then (global variants) :func:`_time_parts`. ``pretrain``: ``local`` steps first, so
  that the latents roughly fill the prior as in training (a fresh encoder's blob keeps more
  multiscale tiles)."""
  import jax
  import jax.numpy as jnp

  from gsae_jax.data import load_dataset
  from gsae_jax.models import make_autoencoder
  from gsae_jax.training.gsae import init_state, make_train_step
  from gsae_jax.training.loop import ExperimentConfig

  base = harness.vm_hwm_mb()
  data = load_dataset(dataset, n_train=n, n_test=None if dataset == "mnist5k" else 1000)
  images = jnp.asarray(data.train_images)
  n = images.shape[0]
  gsae = ExperimentConfig(variant=variant, **config).gsae()
  model = make_autoencoder(config["arch"], 2)
  state = init_state(jax.random.key(0), model, gsae, images)
  if pretrain:
    # `local` draws a new prior sample every step: no potentials to warm-start.
    local = ExperimentConfig(**{**config, "variant": "local", "ot_warm_iters": 0}).gsae()
    pre = init_state(jax.random.key(0), model, local, images)
    local_step = make_train_step(model, local)
    for i in range(pretrain):
      idx = (jnp.arange(local.batch_size) + i * local.batch_size) % n
      pre, _ = local_step(pre, images, idx, jax.random.fold_in(jax.random.key(3), i))
    state = state._replace(params=pre.params, opt_state=pre.opt_state)
  step = make_train_step(model, gsae)
  key, s = jax.random.key(1), 0

  def next_step():
    nonlocal state, s
    idx = (jnp.arange(gsae.batch_size) + s * gsae.batch_size) % n
    state, out = step(state, images, idx, jax.random.fold_in(key, s))
    s += 1
    return out

  t = harness.time_fn(next_step, repeats=steps, jit=False)
  per_step = sum(t.warm_runs_s) / steps
  peak_step = harness.vm_hwm_mb()  # before the parts, whose encoder VJP keeps all activations
  parts = _time_parts(model, gsae, state, images) if variant != "local" else {}
  # n: the images the dataset had; the row's variant, dataset and config are main's.
  out = {**parts, "n": n, "compile_and_first_step_s": t.first_run_s, "step_s": per_step}
  out |= {"steps_per_s": 1 / per_step, "peak_rss_mb": peak_step}
  out |= {"peak_rss_with_parts_mb": harness.vm_hwm_mb(), "rss_after_imports_mb": base}
  return {**out, "loss": float(t.result["loss"])}


def _time_parts(model, config, state, images) -> dict:
  """Median of 3 warm runs, each jitted alone: ``encode_s`` (all images), ``ot_s`` (value and
  gradient of the step's divergence, warm-started with ``ot_warm_iters``), ``encode_vjp_s``
  (encoder forward + VJP of a latent cotangent)."""
  import jax
  import jax.numpy as jnp

  from gsae_jax.training.gsae import encode_all, solve_step_ot

  enc = state.params["encoder"]
  encode = lambda p: encode_all(model, p, images, config.encode_chunk)
  t_encode = harness.time_fn(encode, enc, repeats=3)
  z = t_encode.result
  prior = harness.sample(config.prior, jax.random.key(2), z.shape[0], z.shape[1])

  def ot_loss(z, init=None):  # the step's own call: its backend, grids and settings
    out = solve_step_ot(config, z, prior, init)
    return out.value, out

  ot = jax.value_and_grad(ot_loss, has_aux=True)
  if config.ot_warm_iters:
    (_, cold), _ = jax.jit(ot)(z)
    init = (cold.f_ba, None, cold.f_aa, None)
    ot = jax.value_and_grad(lambda z: ot_loss(z, init), has_aux=True)
  t_ot = harness.time_fn(ot, z, repeats=3)
  (_, out), _ = t_ot.result
  w = jnp.ones_like(z)
  enc_vjp = lambda p: jax.vjp(lambda q: encode_all(model, q, images, 500), p)[1](w)
  times = {"encode_s": t_encode.warm_s, "ot_s": t_ot.warm_s}
  times["encode_vjp_s"] = harness.time_fn(enc_vjp, enc, repeats=3).warm_s
  ot_out = {"ot_backend_used": out.backend, "ot_dense_fallbacks": int(out.dense_fallbacks)}
  return {**times, **ot_out, "ot_kept_tile_fraction": float(out.kept_tile_fraction)}


PARTS = ("OT backend", "encode (s)", "OT value+grad (s)", "encode+VJP (s)")


def markdown(payload: dict) -> str:
  """The table, then a line of the setting (of the flags the run had)."""
  a, rows = payload["args"], payload["rows"]
  columns = [
    "variant, n, arch",
    ("blur/scaling", lambda r: f"{r['blur']:g}/{r['scaling']:g}"),
    ("OT backend", lambda r: r.get("ot_backend_used", r.get("ot_backend", "–"))),
    "steps/s=steps_per_s, s/step=step_s, encode (s)=encode_s, OT value+grad (s)=ot_s",
    "encode+VJP (s)=encode_vjp_s, compile+first (s)=compile_and_first_step_s",
    "peak RSS (MB)=peak_rss_mb, status",
  ]
  if "ot_backend" not in a:  # runs from before --ot_backend did not time the parts
    columns = [c for c in harness.columns(columns) if c[0] not in PARTS]
  bits = [f"load average at start {payload['env']['load_avg_1m_at_start']:.2f}"]
  bits += [
    f"{k}={a[k]}"
    for k in ("prior_self_term", "ot_coarse", "ot_warm_iters", "resample_freq")
    if k in a
  ]
  note = "; ".join(bits) + f"; {a['steps']} timed steps after the first"
  if a.get("pretrain"):
    note += f", from the parameters of {a['pretrain']} `local` steps"
  return harness.table(columns, rows) + "\n\n" + note + "\n"


def main(argv=None) -> dict:
  p = harness.parser(__doc__, n=[4000], variants=([*VARIANTS], None, VARIANTS))
  harness.flags(p, dataset=("mnist5k", "data source for n > 4000"), arch="mlp", steps=5, blur=0.05)
  harness.flags(p, scaling=(0.7, "--blur 2 --scaling 0.3: fast peak RSS"))
  harness.flags(p, prior_self_term=(False, "also the prior's self-term of S"))
  harness.flags(p, ot_backend=("auto", None, ("auto", "dense", "multiscale")))
  harness.flags(p, ot_coarse=("fast", "multiscale coarse grids", ("fast", "accurate")))
  harness.flags(p, ot_warm_iters=(0, "warm-started OT: updates per step"))
  harness.flags(p, resample_freq=(1, "prior redraws (warm OT needs > 1)"))
  harness.flags(p, pretrain=(0, "local steps before the timed ones"))
  p.add_argument("--timeout_s", type=float, default=None, help="kill a config after this long (s)")
  args = harness.parse(p, argv, "train_step")
  env, rows = harness.env_info(), []
  for n in args.n:
    dataset = "mnist5k" if n <= 4000 else args.dataset
    for v in args.variants:
      row = {"variant": v, "n": n, "dataset": dataset, **{k: getattr(args, k) for k in CONFIG}}
      kwargs = {**row, "steps": args.steps, "pretrain": args.pretrain}
      row.update(harness.run_isolated("benchmarks.train_step:measure", kwargs, args.timeout_s))
      rows.append(row)
      rate, peak = row.get("steps_per_s"), row.get("peak_rss_mb") or float("nan")
      rate = f"{rate:.3f} steps/s, " if rate else ""
      harness.log(f"{v} n={n}: {row['status']}, {rate}peak RSS {peak:.0f} MB")
  return harness.save(args.out, args.name, {"env": env, "args": vars(args), "rows": rows}, markdown)


if __name__ == "__main__":
  main()
