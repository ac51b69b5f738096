r"""Two paper_tables sweeps side by side: per variant and metric, whether they differ by more
than the seed spread (issue 13's multiscale-vs-dense training equivalence).

  python -m experiments.compare_tables --a=runs/equiv/dense --b=runs/equiv/multiscale \
      --labels=dense,multiscale --out=runs/equiv/comparison

Writes --out/comparison.{md,json} and prints the table. All logic lives in
gsae_jax.training.tables.compare_sweeps.
"""

import json
import pathlib

from absl import app, flags

from gsae_jax.training.tables import compare_sweeps, comparison_markdown

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "First paper_tables workdir (the reference).")
flags.DEFINE_string("b", None, "Second paper_tables workdir.")
flags.DEFINE_list("labels", ["a", "b"], "Column names of the two sweeps.")
flags.DEFINE_string("out", None, "Directory for comparison.md and comparison.json.")
flags.mark_flags_as_required(["a", "b", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if len(FLAGS.labels) != 2:
    raise app.UsageError(f"--labels needs two names, got {FLAGS.labels}")
  try:
    rows = compare_sweeps(FLAGS.a, FLAGS.b)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  label_a, label_b = FLAGS.labels
  table = comparison_markdown(rows, label_a, label_b)
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  header = (
    f"# {label_b} vs {label_a}\n\n`{FLAGS.a}` vs `{FLAGS.b}`; spread = the larger seed std.\n\n"
  )
  (out / "comparison.md").write_text(header + table)
  payload = {"a": FLAGS.a, "b": FLAGS.b, "labels": FLAGS.labels, "rows": rows}
  (out / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
  print(table, end="")


if __name__ == "__main__":
  app.run(main)
