"""The GSAE train/evaluate loop behind ``python -m experiments.flower_mnist``.

Data go to the device once; each step is one call of the jitted step built by
:func:`gsae_jax.training.gsae.make_train_step`; metrics come to the host only at log steps.
Everything lands in ``workdir``: ``config.json``, ``metrics.jsonl`` (one line per evaluation),
``metrics.json`` (final), ``latents.png``, ``samples.png``, ``reconstructions.png``,
``curves.png`` and a checkpoint after every
evaluation (and on Ctrl-C or SIGTERM) in ``checkpoints/<step>/`` (Orbax, the last two kept)
from which a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import checkpointing, metrics, plotting
from gsae_jax.data import load_dataset
from gsae_jax.models import ARCHS, latent_map_for_prior, make_autoencoder
from gsae_jax.ot import COARSE_GRIDS
from gsae_jax.regularizers import REGULARIZER_NAMES
from gsae_jax.training.gsae import (
  OT_BACKENDS,
  VARIANTS,
  GSAEConfig,
  encode_all,
  init_state,
  make_train_step,
  step_ot_backend,
)


def _setting(default, help_: str, step: bool = False):
  """A field of :class:`ExperimentConfig`: its default, its ``--flag`` help, and whether it is
  a :class:`GSAEConfig` setting (passed to the step)."""
  return dataclasses.field(default=default, metadata={"help": help_, "step": step})


_G = {f.name: f.default for f in dataclasses.fields(GSAEConfig)}  # the step's defaults


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole run: the step's :class:`GSAEConfig` settings plus data, model, schedule and seed.

  The one source of the entry points' flags (:mod:`gsae_jax.training.config_flags`): a new
  setting is one field here (with ``step=True`` if the step reads it, under the same name as
  in :class:`GSAEConfig`, whose default it takes). ``lam=None`` takes the paper's λ of the
  variant, resolved by :class:`GSAEConfig`.
  """

  variant: str = _setting(_G["variant"], f"GSAE variant: {' | '.join(VARIANTS)}.", True)
  regularizer: str = _setting(
    _G["regularizer"],
    f"Latent regulariser: {' | '.join(REGULARIZER_NAMES)} (sinkhorn: the GSAE's).",
    True,
  )
  arch: str = _setting("mlp", f"Encoder/decoder architecture: {' | '.join(ARCHS)}.")
  latent_dim: int = _setting(2, "Latent dimension (the flower prior and the metrics need 2).")
  epochs: int = _setting(50, "Training epochs (paper: 50 MLP, 30 LeNet-5).")
  lam: float | None = _setting(
    None, "Weight λ of the regulariser (default: the paper's, for sinkhorn only).", True
  )
  blur: float = _setting(_G["blur"], "Sinkhorn blur; ε = blur².", True)
  scaling: float = _setting(_G["scaling"], "ε-annealing ratio in (0, 1).", True)
  batch_size: int = _setting(_G["batch_size"], "Minibatch size M.", True)
  recalculate_freq: int = _setting(
    _G["recalculate_freq"], "Steps between latent-cache re-encodes (minibatch_global).", True
  )
  resample_freq: int = _setting(_G["resample_freq"], "Steps between prior redraws.", True)
  encode_chunk: int = _setting(_G["encode_chunk"], "Images per chunk in global encoding.", True)
  prior: str = _setting(
    _G["prior"], "Prior of the latents (the five metrics are defined for 'flower').", True
  )
  prior_self_term: bool = _setting(
    _G["prior_self_term"],
    "Compute the prior's self-term of S each step (same gradients; only the logged train S).",
    True,
  )
  learning_rate: float = _setting(_G["learning_rate"], "Adam learning rate.", True)
  b1: float = _setting(_G["b1"], "Adam b1 (paper: 0.5).", True)
  b2: float = _setting(_G["b2"], "Adam b2.", True)
  ot_backend: str = _setting(
    _G["ot_backend"], f"OT engine backend: {' | '.join(OT_BACKENDS)} (auto: by size).", True
  )
  ot_coarse: str = _setting(
    _G["ot_coarse"],
    f"Multiscale coarse phase: {' | '.join(COARSE_GRIDS)} (fast: half the time, biased value).",
    True,
  )
  ot_warm_iters: int = _setting(
    _G["ot_warm_iters"],
    "Global variants with resample_freq > 1: 0 = cold annealed OT every step (paper); k > 0 = "
    "steps that keep the prior sample start from the last step's potentials (k updates).",
    True,
  )
  n_projections: int = _setting(_G["n_projections"], "Directions of the sliced regulariser.", True)
  sharp_iters: int = _setting(
    _G["sharp_iters"], "Unrolled iterations of the sharp regulariser (ε = blur²).", True
  )
  mmd_sigma2: float = _setting(
    _G["mmd_sigma2"], "Prior variance σ² of the mmd regulariser (IMQ base scale 2dσ²).", True
  )
  dataset: str = _setting("mnist5k", "mnist5k | idx:DIR | tfds:mnist | tfds:fashion_mnist")
  n_train: int | None = _setting(None, "Class-balanced training subset size.")
  n_test: int | None = _setting(None, "Class-balanced test subset size.")
  seed: int = _setting(0, "Root PRNG seed.")
  eval_every: int = _setting(1000, "Steps between evaluations/checkpoints.")
  log_every_s: float = _setting(10.0, "Seconds between progress lines on stderr.")

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"`arch` must be one of {ARCHS}, got {self.arch!r}.")
    for name in ("epochs", "eval_every", "latent_dim"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
    for name in ("n_train", "n_test"):
      if getattr(self, name) is not None and int(getattr(self, name)) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
    self.gsae()  # validates the step settings

  def gsae(self) -> GSAEConfig:
    """The step's settings: every field marked ``step``."""
    return GSAEConfig(
      **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["step"]}
    )


# Settings a resumed run may change: the schedule, logging, the OT backend and its coarse phase
# (speed choices; every backend computes the same divergence, BUILD_NOTES "Multiscale").
_RESUMABLE_CHANGES = ("epochs", "eval_every", "log_every_s", "ot_backend", "ot_coarse")


def config_differences(
  saved: dict[str, Any], config: Any, ignore: tuple[str, ...] = _RESUMABLE_CHANGES
) -> dict[str, tuple[Any, Any]]:
  """``{name: (saved, asked)}`` for the settings of ``config`` (a config dataclass such as
  :class:`ExperimentConfig`) that differ from a saved ``config.json`` (the one
  resume-compatibility check), except those in ``ignore``. A setting missing from ``saved``
  (added after it was written) counts as its default: the behaviour before it existed."""
  defaults = {f.name: f.default for f in dataclasses.fields(config)}
  saved = {**defaults, **saved}
  return {
    k: (saved.get(k), v)
    for k, v in dataclasses.asdict(config).items()
    if k not in ignore and saved.get(k) != v
  }


class _StopRequest:
  """Ctrl-C / SIGTERM handler that only records the signal: the loop stops after the step in
  flight (raising inside the step call would lose its donated input state)."""

  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    if self.signum is not None:  # a second signal: stop now
      raise KeyboardInterrupt(f"signal {signum}")
    self.signum = signum


def _all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def make_eval_fns(model, chunk: int):
  """Jitted chunked ``encode(enc_params, images)`` and ``decode(dec_params, z)``, built once."""

  def decode(dec, z):
    n = z.shape[0]
    c = min(chunk, n)
    pad = (-n) % c
    zs = jnp.concatenate([z, jnp.zeros((pad, z.shape[1]), z.dtype)]).reshape(-1, c, z.shape[1])
    out = jax.lax.map(lambda zc: model.decode(dec, zc), zs)
    return out.reshape((-1,) + out.shape[2:])[:n]

  return jax.jit(lambda enc, x: encode_all(model, enc, x, chunk)), jax.jit(decode)


def _check_workdir(workdir: pathlib.Path, config: ExperimentConfig) -> bool:
  """Whether ``workdir`` holds a run to resume; refuses one whose settings differ."""
  cfg_path = workdir / "config.json"
  resuming = checkpointing.exists(workdir)
  if resuming and not cfg_path.is_file():
    raise ValueError(
      f"{workdir} holds a checkpoint but no config.json, so the settings it was trained with "
      "are unknown; put its config.json back, or use another --workdir (or delete this one)."
    )
  if resuming:
    diff = config_differences(json.loads(cfg_path.read_text()), config)
    if diff:
      raise ValueError(
        f"{workdir} holds a run with a different config {diff} (saved, asked); "
        "use another --workdir or delete it."
      )
  return resuming


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The test-set evaluation of a run: the five metrics, ``metrics.jsonl`` and the figures.

  Build it with :meth:`build`; the figure inputs are fixed for the run (10 prior samples per
  petal, 2 test images per digit).
  """

  encode: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array]
  images: jax.Array
  labels: np.ndarray
  key: jax.Array
  petal_z: jax.Array
  recon_idx: np.ndarray

  @classmethod
  def build(cls, model, encode_chunk: int, data, key: jax.Array) -> Evaluation:
    encode, decode = make_eval_fns(model, encode_chunk)
    labels = np.asarray(data.test_labels)
    recon_idx = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)])[:20]
    petal_z = jnp.asarray(plotting.petal_latents(jax.random.fold_in(key, 1)))
    return cls(encode, decode, jnp.asarray(data.test_images), labels, key, petal_z, recon_idx)

  def preflight(self, params, dataset: str) -> None:
    """The five metrics on the current latents, so that a test set they cannot use (labels
    outside 0..9, too few images) fails before training, not after hours of it."""
    try:
      metrics.evaluate_latents(self.key, self.encode(params["encoder"], self.images), self.labels)
    except ValueError as e:
      raise ValueError(
        f"the test set of {dataset!r} cannot be evaluated ({e}); nothing was trained."
      ) from e

  def __call__(self, workdir: pathlib.Path, params, step: int, train_metrics, records, title):
    """Scores ``params`` at ``step``, appends the record to ``records`` and
    ``metrics.jsonl``, and redraws the figures."""
    z = self.encode(params["encoder"], self.images)
    recon = self.decode(params["decoder"], z)
    scores = metrics.evaluate_latents(self.key, z, self.labels, self.images, recon)
    rec = {"step": step, **{f"train_{k}": v for k, v in train_metrics.items()}, **scores}
    records.append(rec)
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(rec) + "\n")
    title = f"{title}, step {step}"
    plotting.plot_latents(workdir / "latents.png", np.asarray(z), self.labels, title=title)
    samples = self.decode(params["decoder"], self.petal_z)
    plotting.plot_samples(workdir / "samples.png", samples, title=f"{title}: one row per petal")
    plotting.plot_reconstructions(
      workdir / "reconstructions.png",
      self.images[self.recon_idx],
      recon[self.recon_idx],
      title=f"{title}: test reconstructions",
    )
    plotting.plot_curves(workdir / "curves.png", records)
    _log("gsae: eval " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items()))


def _progress(done, total, epoch, last, start, t0) -> str:
  speed = "first step (compiled)"
  if done > start + 1:
    rate = (done - start - 1) / max(time.time() - t0, 1e-9)
    speed = f"{rate:.2f} steps/s ETA {(total - done) / rate / 60:.1f} min"
  return (
    f"gsae: step {done}/{total} epoch {epoch + 1} loss {last['loss']:.5f} "
    f"D {last['reconstruction']:.5f} S {last['sinkhorn']:.5f} {speed}"
  )


def train_and_evaluate(config: ExperimentConfig, workdir: str) -> dict[str, float]:
  """Trains a GSAE as ``config`` says, evaluating and checkpointing into ``workdir``.

  Resumes from ``workdir``'s newest usable checkpoint when there is one (the config must
  match; an unusable one is reported by path and the previous one used, see
  :func:`gsae_jax.checkpointing.restore`). Ctrl-C and SIGTERM save a checkpoint before exiting
  (unless the state is no longer finite); a non-finite loss stops the run with its step number
  and saves nothing.

  Returns:
    The final five metrics (keys of :data:`gsae_jax.metrics.METRIC_NAMES`).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  resuming = _check_workdir(workdir, config)
  data = load_dataset(
    config.dataset, n_train=config.n_train, n_test=config.n_test, seed=config.seed
  )
  gcfg = config.gsae()
  n = data.train_images.shape[0]
  if n < gcfg.batch_size:
    raise ValueError(f"batch_size {gcfg.batch_size} exceeds the {n} training images.")
  steps_per_epoch = n // gcfg.batch_size
  total_steps = config.epochs * steps_per_epoch
  _log(
    f"gsae: {config.variant} {config.arch} on {config.dataset} (n_train={n}, "
    f"n_test={data.test_images.shape[0]}), λ={gcfg.lam}, {config.epochs} epochs = "
    f"{total_steps} steps, OT backend {step_ot_backend(gcfg, n, config.latent_dim)}, "
    f"workdir {workdir}"
  )

  model = make_autoencoder(config.arch, config.latent_dim, latent_map_for_prior(config.prior))
  images = jax.device_put(jnp.asarray(data.train_images))
  k_init, k_train, k_data, k_eval = jax.random.split(jax.random.key(config.seed), 4)
  state = init_state(k_init, model, gcfg, images)
  records: list[dict] = []
  if resuming:
    state, header = checkpointing.restore(workdir, state)
    records = header.get("records", [])
    if int(state.step) > total_steps:
      raise ValueError(
        f"{workdir} already holds {int(state.step)} steps, more than the {total_steps} of "
        f"--epochs={config.epochs}; ask for at least "
        f"{-(-int(state.step) // steps_per_epoch)} epochs, or use another --workdir."
      )
    # The checkpoint's records are the run's history: lines written after it are dropped.
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _log(f"gsae: resumed from step {int(state.step)}")
  evaluation = Evaluation.build(model, gcfg.encode_chunk, data, k_eval)
  evaluation.preflight(state.params, config.dataset)
  (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
  step_fn = make_train_step(model, gcfg)

  def save():
    checkpointing.save(workdir, state, {"step": int(state.step), "records": records})

  def evaluate_and_save(train_metrics):
    title = f"{config.variant} {config.arch}"
    evaluation(workdir, state.params, int(state.step), train_metrics, records, title)
    save()

  start = int(state.step)
  t0 = last_log = time.time()
  last = {}
  # Ctrl-C and `kill` (SIGTERM; background jobs ignore Ctrl-C) stop after the current step
  # and checkpoint it.
  stop = _StopRequest()
  in_main = threading.current_thread() is threading.main_thread()  # signal needs the main one
  previous = (
    {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
  )
  try:
    for step in range(start, total_steps):
      epoch, pos = divmod(step, steps_per_epoch)
      if pos == 0 or step == start:
        perm = jax.random.permutation(jax.random.fold_in(k_data, epoch), n)
      idx = jax.lax.dynamic_slice_in_dim(perm, pos * gcfg.batch_size, gcfg.batch_size)
      state, out = step_fn(state, images, idx, jax.random.fold_in(k_train, step))
      done = step + 1
      if step == start:  # the rate and ETA count from the first step's end: not its compile
        jax.block_until_ready(out)
        t0 = time.time()
      evaluating = done % config.eval_every == 0 or done == total_steps
      if evaluating or time.time() - last_log > config.log_every_s:
        last = {k: float(v) for k, v in out.items()}
        if not all(math.isfinite(v) for v in last.values()):
          # Saving would overwrite the last good checkpoint with a state that cannot recover.
          raise FloatingPointError(
            f"non-finite loss at step {done}: {last}. Nothing was saved: the checkpoint in "
            f"{workdir} (if any) is the last evaluation step's. Lower --lam or the learning "
            "rate, or use a new --workdir."
          )
        _log(_progress(done, total_steps, epoch, last, start, t0))
        last_log = time.time()
      if done % config.eval_every == 0 and done != total_steps:
        evaluate_and_save(last)
      if stop.signum is not None:
        raise KeyboardInterrupt(f"signal {stop.signum}")
  except KeyboardInterrupt:
    try:
      if _all_finite(state.params):
        save()
        _log(f"gsae: interrupted; checkpoint at step {int(state.step)} saved in {workdir}")
      else:
        _log(f"gsae: interrupted at a non-finite state (step {int(state.step)}); nothing saved")
    except RuntimeError as e:  # interrupted inside the step call: its input was donated
      _log(f"gsae: interrupted mid-step, nothing saved ({e}); the last checkpoint is kept")
    raise
  finally:
    for sig, handler in previous.items():
      if handler is not None:  # None: a handler not installed from Python; leave ours
        signal.signal(sig, handler)

  if not records or records[-1]["step"] != int(state.step):
    evaluate_and_save(last)
  final = {k: records[-1][k] for k in metrics.METRIC_NAMES}
  (workdir / "metrics.json").write_text(json.dumps(final, indent=2))
  return final
