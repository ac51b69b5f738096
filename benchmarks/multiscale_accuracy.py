"""The multiscale backend against the dense path on the accuracy tests' clouds: the table.

Each ``--coarse`` setting against the same dense solve, on the clouds and settings of
``tests/test_ot_multiscale_divergence.py`` (``make_case``): the margins by which they pass.

  python -m benchmarks.multiscale_accuracy --dims 2 3
"""

from __future__ import annotations

from benchmarks import harness
from gsae_jax.ot import COARSE_GRIDS


def measure(dims, coarse=COARSE_GRIDS) -> list[dict]:
  """One row per (case, d, coarse grids): dense value, value and gradient differences, tiles."""
  from tests.test_ot_multiscale_divergence import CASES, KW, _rel_l2, _value_and_grad, make_case

  rows = []
  for d in dims:
    for case in CASES:
      x, y, a, b = make_case(case, d)
      vd, gd, _ = _value_and_grad(x, y, a, b, backend="dense")
      for grids in coarse:
        vm, gm, out = _value_and_grad(x, y, a, b, backend="multiscale", coarse=grids, **KW)
        row = {"case": case, "d": d, "coarse": grids, "dense_value": float(vd)}
        row["value_rel_diff"] = harness.rel_err(vm, vd)
        row["grad_rel_l2_diff"] = _rel_l2(gm, gd)  # the tests' own measure
        row["kept_tile_fraction"] = float(out.kept_tile_fraction)
        rows.append({**row, "dense_fallbacks": int(out.dense_fallbacks)})
        harness.log(str(rows[-1]))
  return rows


def markdown(payload: dict) -> str:
  """The table under a title and the setting."""
  columns = [
    "clouds=case, d, coarse, dense S=dense_value, value rel. diff=value_rel_diff",
    "grad rel. L2 diff=grad_rel_l2_diff, tiles kept=kept_tile_fraction",
    "dense fallbacks=dense_fallbacks",
  ]
  args = payload["args"]
  dims, coarse = (" ".join(map(str, args[k])) for k in ("dims", "coarse"))
  return (
    "# Multiscale vs dense (annealed), the accuracy tests' clouds\n\n"
    f"`python -m benchmarks.multiscale_accuracy --dims {dims} --coarse {coarse}`: "
    "n = 1 500 vs 1 300, block 32, "
    "blur 0.05, scaling 0.7, truncate 10, float32; targets: value 1 %, gradient 5 % "
    "(relative L2).\n\n" + harness.table(columns, payload["rows"], 3)
  )


def main(argv=None) -> dict:
  p = harness.parser(__doc__, dims=([2, 3], None, (2, 3)))
  harness.flags(p, coarse=([*COARSE_GRIDS], None, COARSE_GRIDS))
  args = harness.parse(p, argv, "multiscale_accuracy")
  payload = {"env": harness.env_info(), "args": vars(args), "rows": measure(args.dims, args.coarse)}
  return harness.save(args.out, args.name, payload, markdown)


if __name__ == "__main__":
  main()
