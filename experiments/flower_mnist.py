r"""Trains a Global Sinkhorn Autoencoder on MNIST with the flower prior (GSAE paper §5).

  python -m experiments.flower_mnist --variant=minibatch_global --arch=mlp \
      --workdir=runs/mb_global

Writes config.json, metrics.jsonl, metrics.json, latents.png, curves.png and a checkpoint into
--workdir; rerunning with the same --workdir resumes. All logic lives in
gsae_jax.training.loop.train_and_evaluate.
"""

import json

from absl import app, flags

from gsae_jax.models import ARCHS
from gsae_jax.training.gsae import OT_BACKENDS, VARIANTS
from gsae_jax.training.loop import ExperimentConfig, train_and_evaluate

_D = ExperimentConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("variant", _D.variant, list(VARIANTS), "GSAE variant.")
flags.DEFINE_enum("arch", _D.arch, list(ARCHS), "Encoder/decoder architecture.")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs (paper: 50 MLP, 30 LeNet-5).")
flags.DEFINE_float("lam", None, "Weight λ of the Sinkhorn term (default: the paper's λ).")
flags.DEFINE_float("blur", _D.blur, "Sinkhorn blur; ε = blur².")
flags.DEFINE_float("scaling", _D.scaling, "ε-annealing ratio in (0, 1).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Minibatch size M.")
flags.DEFINE_integer("recalculate_freq", _D.recalculate_freq, "Steps between cache re-encodes.")
flags.DEFINE_integer("resample_freq", _D.resample_freq, "Steps between prior redraws.")
flags.DEFINE_bool(
  "prior_self_term",
  _D.prior_self_term,
  "Compute the prior's self-term of S each step (same gradients; only the logged train S).",
)
flags.DEFINE_integer("encode_chunk", _D.encode_chunk, "Images per chunk in global encoding.")
flags.DEFINE_enum(
  "ot_backend", _D.ot_backend, list(OT_BACKENDS), "OT engine backend (auto: multiscale when large)."
)
flags.DEFINE_integer(
  "ot_warm_iters",
  _D.ot_warm_iters,
  "Global variants with resample_freq > 1: 0 = cold annealed OT every step (paper); k > 0 = "
  "steps that keep the prior sample start from the last step's potentials (k updates at blur²).",
)
flags.DEFINE_string("dataset", _D.dataset, "mnist5k | idx:DIR | tfds:mnist | tfds:fashion_mnist")
flags.DEFINE_integer("n_train", None, "Class-balanced training subset size.")
flags.DEFINE_integer("n_test", None, "Class-balanced test subset size.")
flags.DEFINE_integer("seed", _D.seed, "Root PRNG seed.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Steps between evaluations/checkpoints.")
flags.DEFINE_float("log_every_s", _D.log_every_s, "Seconds between progress lines on stderr.")
flags.DEFINE_string("workdir", None, "Output directory (resumes if it holds a checkpoint).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    config = ExperimentConfig(
      variant=FLAGS.variant,
      arch=FLAGS.arch,
      epochs=FLAGS.epochs,
      lam=FLAGS.lam,
      blur=FLAGS.blur,
      scaling=FLAGS.scaling,
      batch_size=FLAGS.batch_size,
      recalculate_freq=FLAGS.recalculate_freq,
      resample_freq=FLAGS.resample_freq,
      encode_chunk=FLAGS.encode_chunk,
      prior_self_term=FLAGS.prior_self_term,
      ot_backend=FLAGS.ot_backend,
      ot_warm_iters=FLAGS.ot_warm_iters,
      dataset=FLAGS.dataset,
      n_train=FLAGS.n_train,
      n_test=FLAGS.n_test,
      seed=FLAGS.seed,
      eval_every=FLAGS.eval_every,
      log_every_s=FLAGS.log_every_s,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  final = train_and_evaluate(config, FLAGS.workdir)
  print(f"{FLAGS.variant} {FLAGS.arch} {FLAGS.dataset}: " + json.dumps(final))


if __name__ == "__main__":
  app.run(main)
