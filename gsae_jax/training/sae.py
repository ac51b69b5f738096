"""The Sinkhorn AutoEncoders paper's MNIST table: SAE, WAE-MMD, SWAE, W2GAE, HAE, (β-)VAE, HVAE.

Patrini et al. (2019), "Sinkhorn AutoEncoders", Table 1 and §6.3, on the same parts as the GSAE:
the MLP of :mod:`gsae_jax.models` with a ``latent_dim``-dimensional latent, its output put where
the prior lives (``sphere`` for the hypersphere, ``simplex`` for a Dirichlet prior, a Gaussian
encoder for the VAEs, a von Mises–Fisher one for the HVAE), and a latent regulariser of
:mod:`gsae_jax.regularizers`. The loss is the paper's eq. (9)::

    L = (1/M) Σ_i ‖x_i − G(Q(x_i))‖²  +  β · R(Q(x_batch), prior sample of M points)

with the squared error *summed* over the 784 pixels (the paper's ``D = (1/M)‖x − x̃‖²₂``; its
RE column is on that scale) and, for the VAEs, ``R`` the KL divergence of the Gaussian encoder
to ``N(0, I)`` (the HVAE: of the von Mises–Fisher encoder to the uniform distribution on the
sphere, Davidson et al. 2018) averaged over the batch, with a reparametrised sample decoded.

A run is scored on the test set as the paper's columns: RE (the same summed squared error of
the deterministic reconstruction), the latent MMD ×10² between the test latents and a prior
sample of the same size (:func:`gsae_jax.regularizers.mmd_squared`, the WAE paper's inverse
multiquadratic kernel), and an FID-like score: the Fréchet distance between decoded prior
samples and test images in the feature space of a LeNet classifier the project trains itself
on the same training set (:mod:`gsae_jax.classifier`; no downloaded weights, so the numbers
are not the paper's FID, only its ordering is comparable).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsae_jax import checkpointing, classifier, plotting, priors, regularizers, vmf
from gsae_jax.data import load_dataset
from gsae_jax.models import Autoencoder, latent_map_for_prior, make_autoencoder
from gsae_jax.training.loop import config_differences


class Row(NamedTuple):
  """One row of the paper's MNIST table (Table 1) or of its §6.3 Dirichlet experiment.

  Attributes:
    model: ``"ae"`` (deterministic encoder and a latent regulariser) or ``"vae"``.
    prior: a name of :func:`gsae_jax.priors.get_prior`.
    regularizer: a name of :func:`gsae_jax.regularizers.get_regularizer`, or ``"kl"``.
    beta: the paper's β.
    settings: the regulariser's settings (e.g. the sharp Sinkhorn loss's ε).
    prior_settings: the prior's parameters besides ``dim``.
    latent_dim: ``None``: the experiment's ``--latent_dim``.
    paper: the paper's ``(MMD ×10², RE, FID)`` on MNIST, ``None`` where it gives none.
  """

  model: str
  prior: str
  regularizer: str
  beta: float
  settings: dict = {}
  prior_settings: dict = {}
  latent_dim: int | None = None
  paper: tuple[float, float, float] | None = None


ROWS: dict[str, Row] = {
  "vae": Row("vae", "standard_normal", "kl", 1.0, paper=(0.28, 12.22, 11.4)),
  "beta_vae": Row("vae", "standard_normal", "kl", 0.1, paper=(2.20, 11.76, 50.0)),
  "wae": Row("ae", "standard_normal", "mmd", 100.0, paper=(0.50, 7.07, 24.4)),
  "swae": Row("ae", "standard_normal", "sliced", 100.0, paper=(0.32, 7.46, 18.8)),
  "w2gae": Row("ae", "standard_normal", "w2gauss", 1.0, paper=(0.67, 7.04, 30.5)),
  "hae": Row("ae", "standard_normal", "hungarian", 100.0, paper=(5.79, 11.84, 16.8)),
  "sae": Row("ae", "standard_normal", "sharp", 100.0, {"epsilon": 10.0}, paper=(5.34, 12.81, 17.2)),
  "hvae": Row("vae", "hypersphere", "kl", 1.0, paper=(0.25, 12.73, 21.5)),
  "wae_sphere": Row("ae", "hypersphere", "mmd", 100.0, paper=(0.24, 7.88, 22.3)),
  "swae_sphere": Row("ae", "hypersphere", "sliced", 100.0, paper=(0.24, 7.80, 27.6)),
  "hae_sphere": Row("ae", "hypersphere", "hungarian", 100.0, paper=(0.23, 8.69, 12.0)),
  "sae_sphere": Row(
    "ae", "hypersphere", "sharp", 100.0, {"epsilon": 0.1}, paper=(0.25, 8.59, 12.5)
  ),
  # §6.3: a 16-dimensional Dir(1/5) prior through a softmax encoder (figures only).
  "sae_dirichlet": Row(
    "ae", "dirichlet", "sharp", 100.0, {"epsilon": 0.1}, {"alpha": 0.2}, latent_dim=16
  ),
}
"""The rows, by name. ``"vae"`` rows with the ``"hypersphere"`` prior are hyperspherical VAEs
(von Mises–Fisher encoder, :mod:`gsae_jax.vmf`)."""

TABLE_ROWS = tuple(name for name, row in ROWS.items() if row.paper is not None)
METRICS = ("mmd_x100", "reconstruction", "fid_like")


def _setting(default, help_: str):
  return dataclasses.field(default=default, metadata={"help": help_})


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """One run of a row of :data:`ROWS`; every field is a flag of ``experiments/sae_mnist``."""

  row: str = _setting("sae_sphere", f"Model row: {' | '.join(ROWS)}.")
  beta: float | None = _setting(None, "Weight β of the regulariser (default: the row's).")
  latent_dim: int = _setting(8, "Latent dimension (a row may fix its own, e.g. Dirichlet 16).")
  epochs: int = _setting(30, "Training epochs.")
  batch_size: int = _setting(100, "Minibatch size M (also the prior sample's size).")
  learning_rate: float = _setting(1e-3, "Adam learning rate.")
  b1: float = _setting(0.5, "Adam b1.")
  b2: float = _setting(0.999, "Adam b2.")
  sharp_iters: int = _setting(100, "Unrolled Sinkhorn iterations of the sharp loss (SAE rows).")
  n_projections: int = _setting(50, "Random directions of the sliced W2 (SWAE rows).")
  dataset: str = _setting("mnist5k", "mnist5k | idx:DIR | tfds:mnist | tfds:fashion_mnist")
  n_train: int | None = _setting(None, "Class-balanced training subset size.")
  n_test: int | None = _setting(None, "Class-balanced test subset size.")
  seed: int = _setting(0, "Root PRNG seed.")
  eval_every: int = _setting(400, "Steps between evaluations/checkpoints.")

  def __post_init__(self):
    if self.row not in ROWS:
      raise ValueError(f"`row` must be one of {tuple(ROWS)}, got {self.row!r}.")
    for name in ("latent_dim", "epochs", "batch_size", "sharp_iters", "n_projections"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
    if self.eval_every < 1:
      raise ValueError(f"`eval_every` must be a positive integer, got {self.eval_every!r}.")
    if self.beta is not None and not (self.beta >= 0 and math.isfinite(self.beta)):
      raise ValueError(f"`beta` must be a non-negative finite number, got {self.beta!r}.")
    for name in ("learning_rate", "b1", "b2"):
      value = getattr(self, name)
      if not (math.isfinite(value) and (0 < value if name == "learning_rate" else 0 <= value < 1)):
        raise ValueError(f"`{name}` out of range: {value!r}.")
    if self.spec.regularizer == "hungarian" and self.batch_size > regularizers.HUNGARIAN_MAX_N:
      raise ValueError(
        f"row {self.row!r} matches batches exactly (Hungarian), up to "
        f"{regularizers.HUNGARIAN_MAX_N} points; --batch_size={self.batch_size} is larger."
      )

  @property
  def spec(self) -> Row:
    return ROWS[self.row]

  @property
  def resolved_beta(self) -> float:
    return float(self.spec.beta if self.beta is None else self.beta)

  @property
  def dim(self) -> int:
    return self.spec.latent_dim or self.latent_dim


class SAEState(NamedTuple):
  """``step`` (int32), ``params`` ``{"encoder", "decoder"}`` and Adam's ``opt_state``."""

  step: jax.Array
  params: Any
  opt_state: Any


def make_model(config: SAEConfig) -> Autoencoder:
  """The MLP autoencoder of a row: a Gaussian (von Mises–Fisher on the hypersphere) encoder
  for the VAEs, else the prior's map."""
  spec = config.spec
  if spec.model == "vae":
    latent_map = "vmf" if spec.prior == "hypersphere" else "gaussian"
  else:
    latent_map = latent_map_for_prior(spec.prior)
  return make_autoencoder("mlp", config.dim, latent_map)


def make_prior(config: SAEConfig):
  """The row's prior sampler ``(key, n) -> [n, dim]``."""
  spec = config.spec
  return priors.get_prior(spec.prior, dim=config.dim, **spec.prior_settings)


def make_regularizer(config: SAEConfig):
  """``R(z [M, d], prior [M, d], key) -> scalar`` of the row, on the paper's scale."""
  spec = config.spec
  fn = regularizers.get_regularizer(spec.regularizer)
  if spec.regularizer == "sharp":
    # The paper's cost is ‖z − z'‖², the OT engine's half that: the same plan on the engine's
    # scale needs ε/2, and its value doubled is the paper's.
    eps = spec.settings["epsilon"]

    def sharp(z, p, key):
      return 2.0 * fn(z, p, epsilon=eps / 2.0, n_iter=config.sharp_iters)

    return sharp
  if spec.regularizer == "sliced":
    return lambda z, p, key: fn(z, p, key=key, n_projections=config.n_projections)
  return lambda z, p, key: fn(z, p, key=key, **spec.settings)


def _sum_sq(x, y):
  """Per-image squared error summed over pixels, averaged over the batch."""
  return jnp.mean(jnp.sum((x - y) ** 2, axis=(1, 2, 3)))


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """``KL(N(mean, diag e^logvar) ‖ N(0, I))`` averaged over the batch ``[M, d]`` (Kingma and
  Welling, 2014): ``½ Σ_j (e^{logvar_j} + mean_j² − 1 − logvar_j)``."""
  return jnp.mean(0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1))


def make_loss(config: SAEConfig, model: Autoencoder):
  """``loss(params, x [M, 28, 28, 1], key) -> (L, (D, R))`` of the row (module docstring)."""
  beta, spec = config.resolved_beta, config.spec
  if spec.model == "vae" and model.latent_map == "vmf":

    def hvae_loss(params, x, key):
      mu, kappa = model.encode_vmf(params["encoder"], x)
      z = vmf.sample(key, mu, kappa)
      d_val = _sum_sq(model.decode(params["decoder"], z), x)
      r_val = jnp.mean(vmf.kl_to_uniform(kappa, mu.shape[1]))
      return d_val + beta * r_val, (d_val, r_val)

    return hvae_loss
  if spec.model == "vae":

    def vae_loss(params, x, key):
      mean, logvar = model.encode_gaussian(params["encoder"], x)
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
      d_val = _sum_sq(model.decode(params["decoder"], z), x)
      r_val = gaussian_kl(mean, logvar)
      return d_val + beta * r_val, (d_val, r_val)

    return vae_loss
  sample, reg = make_prior(config), make_regularizer(config)

  def ae_loss(params, x, key):
    k_prior, k_reg = jax.random.split(key)
    z = model.encode(params["encoder"], x)
    d_val = _sum_sq(model.decode(params["decoder"], z), x)
    r_val = reg(z, sample(k_prior, x.shape[0]), k_reg)
    return d_val + beta * r_val, (d_val, r_val)

  return ae_loss


def make_train_step(config: SAEConfig, model: Autoencoder):
  """The jitted ``(state, images, idx, key) -> (state, {"loss", "reconstruction",
  "regularizer"})`` on the batch ``images[idx]`` (the training set is an argument, gathered
  inside the step), and its optimiser."""
  opt = optax.adam(config.learning_rate, b1=config.b1, b2=config.b2)
  loss = make_loss(config, model)

  def step(state: SAEState, images, idx, key):
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (value, (d_val, r_val)), grads = grad_fn(state.params, images[idx], key)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    new = SAEState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    return new, {"loss": value, "reconstruction": d_val, "regularizer": r_val}

  return jax.jit(step, donate_argnums=0), opt


def evaluate(config: SAEConfig, encode, decode, params, test_images, clf_params, key) -> dict:
  """The paper's columns on the test set: ``mmd_x100``, ``reconstruction``, ``fid_like``.

  Args:
    config: the run.
    encode, decode: the model's jitted ``encode(enc_params, x)`` and ``decode(dec_params, z)``
      (built once per run).
    params: the autoencoder's parameters.
    test_images: ``[N, 28, 28, 1]``.
    clf_params: the feature classifier (:func:`gsae_jax.classifier.train_classifier`).
    key: the evaluation key (one prior sample for the MMD, one to decode).
  """
  n = test_images.shape[0]
  z = encode(params["encoder"], test_images)
  recon = decode(params["decoder"], z)
  k_mmd, k_gen = jax.random.split(key)
  sample = make_prior(config)
  mmd = float(regularizers.mmd_squared(z, sample(k_mmd, n)))
  fakes = decode(params["decoder"], sample(k_gen, n))
  return {
    "mmd_x100": 100.0 * mmd,
    "reconstruction": float(_sum_sq(recon, test_images)),
    "fid_like": float(classifier.fid_like(clf_params, test_images, fakes)),
  }


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def feature_classifier(workdir: pathlib.Path, data, dataset: str, seed: int = 0):
  """The run's feature classifier: read from ``workdir/classifier.msgpack``, or trained on
  ``data``'s training set and saved there (once per sweep)."""
  path = workdir / "classifier.msgpack"
  if path.is_file():
    params, meta = classifier.load_classifier(path)
    if meta.get("dataset") != dataset:
      raise ValueError(
        f"{path} was trained on {meta.get('dataset')!r}, not {dataset!r}; use another --workdir."
      )
    return params
  t0 = time.time()
  params = classifier.train_classifier(jax.random.key(seed), data.train_images, data.train_labels)
  acc = classifier.accuracy(params, data.test_images, data.test_labels)
  classifier.save_classifier(path, params, {"dataset": dataset, "test_accuracy": acc, "seed": seed})
  _log(f"sae: feature classifier trained in {time.time() - t0:.0f} s, test accuracy {acc:.4f}")
  return params


def train_and_evaluate(config: SAEConfig, workdir: str, clf_params=None, data=None) -> dict:
  """Trains one row as ``config`` says, checkpointing and evaluating into ``workdir``.

  Resumes from ``workdir``'s checkpoint (the saved ``config.json`` must match); a non-finite
  loss stops the run with its step and saves nothing.

  Returns:
    The final :data:`METRICS`.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  saved = workdir / "config.json"
  if checkpointing.exists(workdir):
    if not saved.is_file():
      raise ValueError(f"{workdir} holds a checkpoint but no config.json; use another --workdir.")
    diff = config_differences(json.loads(saved.read_text()), config, ("epochs", "eval_every"))
    if diff:
      raise ValueError(f"{workdir} holds a run with other settings {diff} (saved, asked).")
  if data is None:
    data = load_dataset(config.dataset, n_train=config.n_train, n_test=config.n_test, seed=0)
  n = data.train_images.shape[0]
  if n < config.batch_size:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training images.")
  if clf_params is None:
    clf_params = feature_classifier(workdir, data, config.dataset)
  steps_per_epoch = n // config.batch_size
  total = config.epochs * steps_per_epoch
  model = make_model(config)
  step_fn, opt = make_train_step(config, model)
  k_init, k_train, k_data, k_eval = jax.random.split(jax.random.key(config.seed), 4)
  params = model.init(k_init)
  state = SAEState(jnp.int32(0), params, opt.init(params))
  records: list[dict] = []
  if checkpointing.exists(workdir):
    state, header = checkpointing.restore(workdir, state)
    records = header.get("records", [])
    if int(state.step) > total:
      raise ValueError(f"{workdir} holds {int(state.step)} steps, more than --epochs gives.")
  saved.write_text(json.dumps(dataclasses.asdict(config), indent=2))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  images = jax.device_put(jnp.asarray(data.train_images))
  test_images = jnp.asarray(data.test_images)
  sample = make_prior(config)
  encode, decode = jax.jit(model.encode), jax.jit(model.decode)

  def evaluate_and_save(last):
    scores = evaluate(config, encode, decode, state.params, test_images, clf_params, k_eval)
    rec = {"step": int(state.step), **{f"train_{k}": v for k, v in last.items()}, **scores}
    records.append(rec)
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(rec) + "\n")
    title = f"{config.row}, step {rec['step']}"
    fakes = decode(state.params["decoder"], sample(jax.random.fold_in(k_eval, 2), 100))
    plotting.plot_samples(workdir / "samples.png", fakes, title=title, row_label=None)
    if model.latent_map == "simplex":  # §6.3: what each vertex of the simplex decodes to
      vertices = decode(state.params["decoder"], jnp.eye(config.dim))
      plotting.plot_image_row(workdir / "vertices.png", vertices, title=f"{title}: vertices")
    checkpointing.save(workdir, state, {"step": int(state.step), "records": records})
    _log(
      f"sae: {config.row} seed {config.seed} " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items())
    )

  t0, last, start = time.time(), {}, int(state.step)
  for step in range(start, total):
    epoch, pos = divmod(step, steps_per_epoch)
    if pos == 0 or step == start:
      perm = jax.random.permutation(jax.random.fold_in(k_data, epoch), n)
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * config.batch_size, config.batch_size)
    state, out = step_fn(state, images, idx, jax.random.fold_in(k_train, step))
    done = step + 1
    if done % config.eval_every == 0 or done == total:
      last = {k: float(v) for k, v in out.items()}
      if not all(math.isfinite(v) for v in last.values()):
        raise FloatingPointError(
          f"non-finite loss at step {done}: {last}; nothing saved. Lower --beta or the "
          "learning rate."
        )
      evaluate_and_save(last)
  if not records:  # a zero-step run: score the initialisation
    evaluate_and_save(last)
  final = {k: records[-1][k] for k in METRICS}
  (workdir / "metrics.json").write_text(json.dumps(final, indent=2))
  _log(f"sae: {config.row} seed {config.seed} done in {time.time() - t0:.0f} s: {final}")
  return final


def _fmt(values: list[float]) -> str:
  if not values:
    return "–"
  mean = float(np.mean(values))
  return f"{mean:.3g} ± {float(np.std(values, ddof=1)):.2g}" if len(values) > 1 else f"{mean:.3g}"


def real_image_reference(clf_params, data) -> float:
  """FID-like score of real training images against the test set: a random subset as large
  as the test set (mnist5k's training images are sorted by class, so not the first ones).
  A scale for the models' scores, not a floor: the classifier was trained on these images."""
  n_train, n_test = data.train_images.shape[0], data.test_images.shape[0]
  subset = np.random.default_rng(0).permutation(n_train)[: min(n_train, n_test)]
  return classifier.fid_like(clf_params, data.test_images, data.train_images[subset])


def write_report(
  workdir: pathlib.Path, results: dict, command: str = "", reference: float | None = None
) -> pathlib.Path:
  """``results.md`` and ``results.json``: mean ± std over seeds per row beside the paper.

  ``results`` maps row → seed → final metrics, or to the error string of a failed run;
  ``reference``: :func:`real_image_reference`, stated under the table.
  """
  lines = [
    "# Sinkhorn AutoEncoders paper, MNIST table (Table 1) structure",
    "",
    f"Command: `{command}`" if command else "",
    "",
    "Ours: mean ± sample std over seeds (n). Paper: MNIST column of Table 1. MMD ×10² and the "
    "FID-like score are not on the paper's scale (own kernel settings, own LeNet features): "
    "compare orderings, not values.",
    "",
    "| row | prior | cost | β | n | MMD ×10² | RE | FID-like | paper MMD | paper RE | paper FID |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  failed = []
  for name, by_seed in results.items():
    spec = ROWS[name]
    ok = [m for m in by_seed.values() if isinstance(m, dict)]
    failed += [f"{name} seed {s}: {m}" for s, m in by_seed.items() if not isinstance(m, dict)]
    ours = [_fmt([m[k] for m in ok]) for k in METRICS]
    paper = [f"{v:g}" for v in spec.paper] if spec.paper else ["–"] * 3
    lines.append(
      f"| {name} | {spec.prior} | {spec.regularizer} | {spec.beta:g} | {len(ok)} | "
      + " | ".join(ours + paper)
      + " |"
    )
  if reference is not None:
    lines += [
      "",
      f"FID-like of real training images against the test set: {reference:.3g} (a scale for "
      "the scores above; the feature classifier was trained on these images).",
    ]
  if failed:
    lines += ["", "Failed runs (not tabled):", *[f"- {f}" for f in failed]]
  lines += ["", "Decoded prior samples of each row's first seed:", "", "![samples](samples.png)"]
  path = workdir / "results.md"
  path.write_text("\n".join(lines) + "\n")
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return path


def sample_sheet(workdir: pathlib.Path, rows, seed: int, per_row: int = 10) -> pathlib.Path:
  """``samples.png`` in ``workdir``: ``per_row`` decoded prior samples of each finished row's
  run ``{row}_seed{seed}``, one labelled row per model, the same prior key for all."""
  images, labels = [], []
  for row in rows:
    run_dir = workdir / f"{row}_seed{seed}"
    if not (run_dir / "metrics.json").is_file():
      continue
    config = SAEConfig(**json.loads((run_dir / "config.json").read_text()))
    model = make_model(config)
    params = model.init(jax.random.key(0))
    template = SAEState(jnp.int32(0), params, optax.adam(1e-3).init(params))
    state, _ = checkpointing.restore(run_dir, template)
    z = make_prior(config)(jax.random.key(seed), per_row)
    images.append(np.asarray(model.decode(state.params["decoder"], z)))
    labels.append(row)
  path = workdir / "samples.png"
  if images:
    plotting.plot_labelled_rows(
      path, np.concatenate(images), labels, title=f"decoded prior samples, seed {seed}"
    )
  return path


def run_table(
  base: SAEConfig,
  workdir: str | pathlib.Path,
  *,
  rows: tuple[str, ...] = TABLE_ROWS,
  seeds: tuple[int, ...] = (0, 1, 2),
  command: str = "",
) -> dict:
  """Trains ``rows × seeds`` (each in ``workdir/{row}_seed{s}``) and writes the report.

  A run whose ``metrics.json`` exists is read back; a failed run is reported and not tabled
  (the next call retries it); the feature classifier is trained once per ``workdir``.

  Returns:
    ``{row: {seed: metrics or error string}}``.
  """
  for what, values, valid in (("rows", rows, ROWS), ("seeds", seeds, None)):
    if not values:
      raise ValueError(f"`{what}` must not be empty.")
    dupes = sorted({v for v in values if list(values).count(v) > 1}, key=str)
    if dupes:
      raise ValueError(f"`{what}` repeats {dupes}: each run must appear once.")
    unknown = [v for v in values if valid is not None and v not in valid]
    if unknown:
      raise ValueError(f"unknown {what} {unknown}; valid: {list(valid)}")
  configs = {(r, s): dataclasses.replace(base, row=r, seed=int(s)) for r in rows for s in seeds}
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = load_dataset(base.dataset, n_train=base.n_train, n_test=base.n_test, seed=0)
  clf = feature_classifier(workdir, data, base.dataset)
  reference = real_image_reference(clf, data)
  results: dict = {r: {} for r in rows}
  for i, ((r, s), cfg) in enumerate(configs.items()):
    run_dir = workdir / f"{r}_seed{s}"
    final = run_dir / "metrics.json"
    if final.is_file():
      results[r][s] = json.loads(final.read_text())
      _log(f"sae: [{i + 1}/{len(configs)}] {r} seed {s}: done before, read {final}")
    else:
      _log(f"sae: [{i + 1}/{len(configs)}] {r} seed {s}: training ...")
      try:
        results[r][s] = train_and_evaluate(cfg, str(run_dir), clf_params=clf, data=data)
      except (ValueError, FloatingPointError) as e:
        results[r][s] = f"{type(e).__name__}: {e}"
        _log(f"sae: {r} seed {s} FAILED: {e}")
    write_report(workdir, results, command, reference)
  sample_sheet(workdir, rows, seeds[0])
  return results
