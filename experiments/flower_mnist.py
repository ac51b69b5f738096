r"""Trains a Global Sinkhorn Autoencoder on MNIST with the flower prior (GSAE paper §5).

  python -m experiments.flower_mnist --variant=minibatch_global --arch=mlp \
      --workdir=runs/mb_global

Writes config.json, metrics.jsonl, metrics.json, latents.png, curves.png and a checkpoint into
--workdir; rerunning with the same --workdir resumes. All logic lives in
gsae_jax.training.loop.train_and_evaluate.
"""

import json

from absl import app, flags

from experiments import compile_cache
from gsae_jax.training import config_flags
from gsae_jax.training.config_flags import config_from_flags, define_flags
from gsae_jax.training.loop import ExperimentConfig, train_and_evaluate

FLAGS = flags.FLAGS
_SETTINGS = define_flags(ExperimentConfig)  # one flag per setting, help and default included
flags.adopt_module_key_flags(config_flags)  # listed by --help
flags.adopt_module_key_flags(compile_cache)
flags.DEFINE_string("workdir", None, "Output directory (resumes if it holds a checkpoint).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  compile_cache.enable()
  try:
    config = config_from_flags(ExperimentConfig, _SETTINGS)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  final = train_and_evaluate(config, FLAGS.workdir)
  print(f"{config.variant} {config.arch} {config.dataset}: " + json.dumps(final))


if __name__ == "__main__":
  app.run(main)
