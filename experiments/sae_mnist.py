r"""The Sinkhorn AutoEncoders paper's MNIST table (Table 1) on the same parts as the GSAE.

  python -m experiments.sae_mnist --seeds=3 --epochs=30 --workdir=runs/sae_mnist
  python -m experiments.sae_mnist --rows=sae_dirichlet --seeds=1 --workdir=runs/sae_dirichlet

Trains every row (VAE, β-VAE, WAE-MMD, SWAE, W2GAE, HAE, SAE under the Gaussian and the
hypersphere prior) × seed, each in --workdir/{row}_seed{s}, and writes --workdir/results.md:
latent MMD ×10², reconstruction error and an FID-like score (mean ± std over seeds) beside the
paper's numbers. Rerunning the same command skips finished runs. All logic lives in
gsae_jax.training.sae.
"""

import shlex
import sys

from absl import app, flags

from experiments import compile_cache
from gsae_jax.training import config_flags
from gsae_jax.training.config_flags import config_from_flags, define_flags, parse_seeds
from gsae_jax.training.sae import ROWS, TABLE_ROWS, SAEConfig, run_table

FLAGS = flags.FLAGS
_SETTINGS = define_flags(SAEConfig, skip=("row", "seed"))
flags.adopt_module_key_flags(config_flags)  # listed by --help
flags.adopt_module_key_flags(compile_cache)
flags.DEFINE_list("rows", list(TABLE_ROWS), f"Rows to train: {', '.join(ROWS)}.")
flags.DEFINE_list("seeds", ["3"], "A count N (seeds 0..N-1) or a list of seeds, e.g. 0,3,7.")
flags.DEFINE_string("workdir", None, "Root directory of the table (resumes).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  compile_cache.enable()
  try:
    base = config_from_flags(SAEConfig, _SETTINGS)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  command = "python -m experiments.sae_mnist " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  try:
    results = run_table(
      base,
      FLAGS.workdir,
      rows=tuple(FLAGS.rows),
      seeds=tuple(parse_seeds(FLAGS.seeds)),
      command=command,
    )
  except ValueError as e:  # bad rows / seeds, or a workdir from another config
    raise app.UsageError(str(e)) from e
  runs = [m for by_seed in results.values() for m in by_seed.values()]
  done = sum(isinstance(m, dict) for m in runs)
  print(
    f"sae_mnist: {done}/{len(runs)} runs finished ({len(runs) - done} failed); "
    f"report in {FLAGS.workdir}/results.md"
  )


if __name__ == "__main__":
  app.run(main)
