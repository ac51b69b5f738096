r"""The GSAE paper's Tables 1 and 2: three variants × N seeds, or a λ grid search.

  python -m experiments.paper_tables --arch=mlp --epochs=10 --seeds=3 --workdir=runs/tables_mlp
  python -m experiments.paper_tables --arch=mlp --epochs=5 --seeds=2 \
      --sweep_lam=0.01,0.1,1,10,100 --workdir=runs/sweep_mlp

Each run lands in its own subdirectory of --workdir; rerunning the same command skips finished
runs and resumes a half-finished one. --workdir/results.md holds mean ± std per metric and
variant beside the paper's numbers, and the latent, sample and reconstruction figures. All logic
lives in gsae_jax.training.tables.
"""

import shlex
import sys

from absl import app, flags

from gsae_jax.models import ARCHS
from gsae_jax.training.gsae import OT_BACKENDS, VARIANTS
from gsae_jax.training.loop import ExperimentConfig
from gsae_jax.training.tables import run_table

_D = ExperimentConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", _D.arch, list(ARCHS), "Encoder/decoder architecture.")
flags.DEFINE_string("dataset", _D.dataset, "mnist5k | idx:DIR | tfds:mnist | tfds:fashion_mnist")
flags.DEFINE_integer("n_train", None, "Class-balanced training subset size.")
flags.DEFINE_integer("n_test", None, "Class-balanced test subset size.")
flags.DEFINE_integer("epochs", 10, "Training epochs per run (paper: 50 MLP, 30 LeNet-5).")
flags.DEFINE_list("seeds", ["3"], "A count N (seeds 0..N-1) or a list of seeds, e.g. 0,3,7.")
flags.DEFINE_list("variants", list(VARIANTS), "Variants to train.")
flags.DEFINE_float("lam_local", None, "λ of local (default: the paper's 0.1).")
flags.DEFINE_float("lam_minibatch_global", None, "λ of minibatch_global (default: 100).")
flags.DEFINE_float("lam_full_global", None, "λ of full_global (default: 0.1).")
flags.DEFINE_list("sweep_lam", [], "λ grid: train every variant at each λ and rank them.")
flags.DEFINE_float("blur", _D.blur, "Sinkhorn blur; ε = blur².")
flags.DEFINE_float("scaling", _D.scaling, "ε-annealing ratio in (0, 1).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Minibatch size M.")
flags.DEFINE_enum(
  "ot_backend", _D.ot_backend, list(OT_BACKENDS), "OT engine backend (auto: multiscale when large)."
)
flags.DEFINE_integer(
  "ot_warm_iters",
  _D.ot_warm_iters,
  "Global variants with resample_freq > 1: 0 = cold annealed OT every step (paper); k > 0 = "
  "steps that keep the prior sample start from the last step's potentials (k updates at blur²).",
)
flags.DEFINE_integer("eval_every", 200, "Steps between evaluations/checkpoints of each run.")
flags.DEFINE_string("workdir", None, "Root directory of the sweep (resumes).")
flags.mark_flag_as_required("workdir")


def _seeds(values: list[str]) -> list[int]:
  try:
    ints = [int(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers, got {values}") from e
  if len(ints) == 1:
    if ints[0] < 1:
      raise app.UsageError(f"--seeds count must be positive, got {ints[0]}")
    return list(range(ints[0]))
  return ints


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = [v for v in FLAGS.variants if v not in VARIANTS]
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
  try:
    sweep = [float(v) for v in FLAGS.sweep_lam]
  except ValueError as e:
    raise app.UsageError(f"--sweep_lam must be numbers, got {FLAGS.sweep_lam}") from e
  try:
    base = ExperimentConfig(
      arch=FLAGS.arch,
      epochs=FLAGS.epochs,
      blur=FLAGS.blur,
      scaling=FLAGS.scaling,
      batch_size=FLAGS.batch_size,
      ot_backend=FLAGS.ot_backend,
      ot_warm_iters=FLAGS.ot_warm_iters,
      dataset=FLAGS.dataset,
      n_train=FLAGS.n_train,
      n_test=FLAGS.n_test,
      eval_every=FLAGS.eval_every,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  lams = {
    "local": FLAGS.lam_local,
    "minibatch_global": FLAGS.lam_minibatch_global,
    "full_global": FLAGS.lam_full_global,
  }
  command = "python -m experiments.paper_tables " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  try:
    results = run_table(
      base,
      FLAGS.workdir,
      variants=FLAGS.variants,
      seeds=_seeds(FLAGS.seeds),
      lams={k: v for k, v in lams.items() if v is not None},
      sweep_lams=sweep or None,
      command=command,
    )
  except ValueError as e:  # bad variants / seeds / λ grid, or a workdir from another config
    raise app.UsageError(str(e)) from e
  done = sum(r.metrics is not None for r in results)
  print(
    f"paper_tables: {done}/{len(results)} runs finished "
    f"({len(results) - done} failed); report in {FLAGS.workdir}/results.md"
  )


if __name__ == "__main__":
  app.run(main)
