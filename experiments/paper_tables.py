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

from experiments import compile_cache
from gsae_jax.training import config_flags
from gsae_jax.training.config_flags import config_from_flags, define_flags, parse_seeds
from gsae_jax.training.gsae import VARIANTS
from gsae_jax.training.loop import ExperimentConfig
from gsae_jax.training.tables import run_table

FLAGS = flags.FLAGS
# The run settings (each run's variant, λ and seed come from the sweep flags below).
_SETTINGS = define_flags(
  ExperimentConfig, skip=("variant", "lam", "seed"), defaults={"epochs": 10, "eval_every": 200}
)
flags.adopt_module_key_flags(config_flags)  # listed by --help
flags.adopt_module_key_flags(compile_cache)
flags.DEFINE_list("seeds", ["3"], "A count N (seeds 0..N-1) or a list of seeds, e.g. 0,3,7.")
flags.DEFINE_list("variants", list(VARIANTS), "Variants to train.")
flags.DEFINE_float("lam_local", None, "λ of local (default: the paper's 0.1).")
flags.DEFINE_float("lam_minibatch_global", None, "λ of minibatch_global (default: 100).")
flags.DEFINE_float("lam_full_global", None, "λ of full_global (default: 0.1).")
flags.DEFINE_list("sweep_lam", [], "λ grid: train every variant at each λ and rank them.")
flags.DEFINE_string("workdir", None, "Root directory of the sweep (resumes).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  compile_cache.enable()
  bad = [v for v in FLAGS.variants if v not in VARIANTS]
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
  try:
    sweep = [float(v) for v in FLAGS.sweep_lam]
  except ValueError as e:
    raise app.UsageError(f"--sweep_lam must be numbers, got {FLAGS.sweep_lam}") from e
  lams = {
    "local": FLAGS.lam_local,
    "minibatch_global": FLAGS.lam_minibatch_global,
    "full_global": FLAGS.lam_full_global,
  }
  # The paper's λ are the Sinkhorn's: another regulariser needs each variant's λ (or a grid).
  # The base config then holds one of them only to pass its checks; each run sets its own.
  given = sweep or [lams[v] for v in FLAGS.variants if lams[v] is not None]
  if FLAGS.regularizer != "sinkhorn":
    missing = [v for v in FLAGS.variants if lams[v] is None]
    if missing and not sweep:
      raise app.UsageError(
        f"--regularizer={FLAGS.regularizer} has no paper λ: pass "
        + ", ".join(f"--lam_{v}" for v in missing)
        + " or --sweep_lam."
      )
  try:
    overrides = {"lam": given[0]} if FLAGS.regularizer != "sinkhorn" else {}
    base = config_from_flags(ExperimentConfig, _SETTINGS, **overrides)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  command = "python -m experiments.paper_tables " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  try:
    results = run_table(
      base,
      FLAGS.workdir,
      variants=FLAGS.variants,
      seeds=parse_seeds(FLAGS.seeds),
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
