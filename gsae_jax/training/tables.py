"""Multi-seed, multi-variant GSAE sweeps and the ``results.md`` report (GSAE paper Tables 1, 2).

:func:`run_table` trains every (variant, λ, seed) of a sweep with
:func:`gsae_jax.training.loop.train_and_evaluate`, each in its own subdirectory of ``workdir``
(``{arch}_{variant}_seed{s}``, or ``{arch}_{variant}_lam{λ}_seed{s}`` in a λ sweep). A run whose
``metrics.json`` exists is read back, not redone; a half-finished run resumes from its
checkpoint. After every run ``results.json`` and ``results.md`` are rewritten, so an interrupted
sweep leaves a valid report of what finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from gsae_jax.metrics import METRIC_NAMES
from gsae_jax.training.gsae import VARIANTS
from gsae_jax.training.loop import ExperimentConfig, config_differences, train_and_evaluate

# SPEC §5: the GSAE paper's Tables 1 (MLP, 50 epochs) and 2 (LeNet-5, 30 epochs), means over 5
# seeds, for (local, minibatch_global, full_global).
PAPER_TABLES = {
  "mlp": {
    "epochs": 50,
    "global_ot_loss": (0.018, 0.013, 0.014),
    "reconstruction": (0.036, 0.034, 0.034),
    "local_clustering": (0.456, 0.505, 0.516),
    "cluster_matching": (0.55, 0.64, 0.64),
    "covered_area": (0.83, 0.89, 0.87),
  },
  "lenet": {
    "epochs": 30,
    "global_ot_loss": (0.016, 0.011, 0.015),
    "reconstruction": (0.0362, 0.0360, 0.0356),
    "local_clustering": (0.534, 0.531, 0.575),
    "cluster_matching": (0.637, 0.641, 0.632),
    "covered_area": (0.862, 0.893, 0.862),
  },
}
LOWER_IS_BETTER = {"global_ot_loss", "reconstruction"}


def run_name(arch: str, variant: str, seed: int, lam: float | None = None) -> str:
  """Subdirectory of one run: ``{arch}_{variant}[_lam{λ}]_seed{seed}``."""
  lam_part = "" if lam is None else f"_lam{lam:g}"
  return f"{arch}_{variant}{lam_part}_seed{seed}"


@dataclasses.dataclass
class RunResult:
  """One finished (or failed) run of a sweep."""

  variant: str
  seed: int
  lam: float
  name: str
  metrics: dict[str, float] | None = None
  error: str | None = None


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run_table(
  base: ExperimentConfig,
  workdir: str | pathlib.Path,
  *,
  variants: Sequence[str] = VARIANTS,
  seeds: Sequence[int] = (0, 1, 2),
  lams: dict[str, float] | None = None,
  sweep_lams: Sequence[float] | None = None,
  command: str = "",
  train_fn: Callable[[ExperimentConfig, str], dict[str, float]] = train_and_evaluate,
) -> list[RunResult]:
  """Trains ``variants × seeds`` (× ``sweep_lams``) and writes ``results.{md,json}``.

  Args:
    base: settings shared by every run (arch, data, epochs, blur, ...); its ``variant``,
      ``lam`` and ``seed`` are replaced per run.
    workdir: root directory; one subdirectory per run.
    variants: which of :data:`VARIANTS` to train.
    seeds: root seeds.
    lams: λ per variant (``None`` or a missing variant: the paper's λ).
    sweep_lams: if given, every variant is trained at each of these λ (a grid search), and the
      report ranks them.
    command: the command line, quoted in the report.
    train_fn: the trainer (``train_and_evaluate``), a parameter for tests.

  Returns:
    One :class:`RunResult` per run, in sweep order. A run that raised (e.g. a non-finite loss)
    is recorded with its error and the sweep goes on; Ctrl-C stops the sweep.
  """
  workdir = pathlib.Path(workdir)
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown variant {v!r}; expected a subset of {VARIANTS}.")
  for what, values in (("variants", variants), ("seeds", seeds), ("sweep_lams", sweep_lams)):
    values = list(values or ())
    if what != "sweep_lams" and not values:
      raise ValueError(f"`{what}` must not be empty.")
    dupes = sorted({v for v in values if values.count(v) > 1}, key=str)
    if dupes:  # a run counted twice would fake a seed spread ("n=2", "± 0")
      raise ValueError(f"`{what}` repeats {dupes}: each run must appear once.")
  workdir.mkdir(parents=True, exist_ok=True)
  plan = []
  for v in variants:
    lam_list = list(sweep_lams) if sweep_lams else [(lams or {}).get(v)]
    for lam in lam_list:
      for s in seeds:
        cfg = dataclasses.replace(base, variant=v, lam=lam, seed=int(s))
        name = run_name(base.arch, v, int(s), lam if sweep_lams else None)
        plan.append((cfg, name))

  results: list[RunResult] = []
  for i, (cfg, name) in enumerate(plan):
    lam = cfg.gsae().lam
    res = RunResult(cfg.variant, cfg.seed, lam, name)
    final = workdir / name / "metrics.json"
    _check_same_config(workdir / name, cfg)
    if final.is_file():
      res.metrics = json.loads(final.read_text())
      _log(f"tables: [{i + 1}/{len(plan)}] {name}: done before, read {final}")
    else:
      _log(f"tables: [{i + 1}/{len(plan)}] {name}: training ...")
      t0 = time.time()
      try:
        res.metrics = train_fn(cfg, str(workdir / name))
        _log(f"tables: {name} finished in {(time.time() - t0) / 60:.1f} min")
      except Exception as e:  # noqa: BLE001 — a failed run is a row of the report
        res.error = f"{type(e).__name__}: {e}"
        _log(f"tables: {name} FAILED: {res.error}")
    results.append(res)
    write_report(workdir, base, results, sweep=bool(sweep_lams), command=command)
  return results


def _check_same_config(run_dir: pathlib.Path, cfg: ExperimentConfig) -> None:
  """A finished run is only reused for the same settings (logging and the OT engine's speed
  choices aside)."""
  path = run_dir / "config.json"
  if not path.is_file():
    return
  ignore = ("log_every_s", "ot_backend", "ot_coarse")
  diff = config_differences(json.loads(path.read_text()), cfg, ignore=ignore)
  if diff:
    raise ValueError(
      f"{run_dir} holds a run with other settings {diff} (saved, asked); "
      "use another --workdir or delete that run."
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(results: Sequence[RunResult]) -> dict[tuple[str, float], dict]:
  """Mean, sample std (ddof 1) and count of each metric per (variant, λ) over finished runs."""
  groups: dict[tuple[str, float], list[RunResult]] = {}
  for r in results:
    groups.setdefault((r.variant, r.lam), []).append(r)
  out = {}
  for key, runs in groups.items():
    ok = [r.metrics for r in runs if r.metrics is not None]
    stats = {m: _mean_std([x[m] for x in ok]) if ok else (math.nan, math.nan) for m in METRIC_NAMES}
    out[key] = {"n": len(ok), "failed": [r.name for r in runs if r.error], **stats}
  return out


def _cell(mean: float, std: float, n: int) -> str:
  if n == 0:
    return "–"
  return f"{mean:.4g} ± {std:.2g}" if n > 1 else f"{mean:.4g}"


def write_report(
  workdir: pathlib.Path,
  base: ExperimentConfig,
  results: Sequence[RunResult],
  *,
  sweep: bool,
  command: str,
) -> None:
  """Writes ``results.json`` (every run) and ``results.md`` (tables + figures) into ``workdir``."""
  summary = summarize(results)
  payload = {
    "config": dataclasses.asdict(base),
    "command": command,
    "runs": [dataclasses.asdict(r) for r in results],
    "summary": [
      {"variant": v, "lam": lam, **{k: s for k, s in st.items()}}
      for (v, lam), st in summary.items()
    ],
  }
  (workdir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")

  paper = PAPER_TABLES.get(base.arch)
  lines = [f"# GSAE results: {base.arch} on {base.dataset}, regulariser {base.regularizer}", ""]
  if command:
    lines += ["```bash", command, "```", ""]
  lines += [
    f"{base.epochs} epochs (paper: {paper['epochs'] if paper else '?'} epochs on 60 000 MNIST "
    f"images), blur {base.blur}, scaling {base.scaling}, batch {base.batch_size}, "
    f"n_train {base.n_train or 'all'}, n_test {base.n_test or 'all'}. Mean ± sample std over "
    "the finished seeds (n); metrics on the test set (SPEC §5).",
    "",
  ]
  if base.regularizer != "sinkhorn":
    lines += ["The paper columns are the GSAE paper's Sinkhorn models, for scale.", ""]
  if sweep:
    lines += _sweep_tables(summary)
  else:
    lines += _variant_table(summary, paper)
  failed = [r for r in results if r.error]
  if failed:
    lines += ["", "Failed runs:", ""] + [f"- `{r.name}`: {r.error}" for r in failed]
  lines += ["", "## Figures (first seed of each group)", ""]
  seen, firsts = set(), []
  for r in results:
    key = (r.variant, r.lam)
    if key in seen or r.metrics is None:
      continue
    seen.add(key)
    firsts.append(r)
    lines += [f"**{r.variant}, λ = {r.lam:g}** (`{r.name}`)", ""]
    figs = [
      f
      for f in ("latents", "samples", "reconstructions")
      if (workdir / r.name / f"{f}.png").is_file()
    ]
    lines += [" ".join(f"![{r.name} {f}]({r.name}/{f}.png)" for f in figs), ""]
  if _side_by_side(workdir, [r.name for r in firsts], "latents_side_by_side.png"):
    lines[lines.index("## Figures (first seed of each group)") + 2 : 0] = [
      "![latents side by side](latents_side_by_side.png)",
      "",
    ]
  (workdir / "results.md").write_text("\n".join(lines) + "\n")


def _side_by_side(workdir: pathlib.Path, names: Sequence[str], out: str) -> bool:
  """Writes the runs' ``latents.png`` next to each other into ``workdir/out``, if all exist."""
  paths = [workdir / n / "latents.png" for n in names]
  if not paths or not all(p.is_file() for p in paths):
    return False
  from gsae_jax import plotting  # matplotlib with the Agg backend

  plt = plotting.plt
  fig, axes = plt.subplots(1, len(paths), figsize=(4.5 * len(paths), 4.6), dpi=100, squeeze=False)
  for ax, path in zip(axes[0], paths, strict=True):
    ax.imshow(plt.imread(path))
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(workdir / out)
  plt.close(fig)
  return True


def _variant_table(summary, paper) -> list[str]:
  keys = sorted(summary, key=lambda k: VARIANTS.index(k[0]))
  head = ["metric"]
  for v, lam in keys:
    n = summary[(v, lam)]["n"]
    head += [f"{v} (λ={lam:g}, n={n})"] + ([f"paper {v}"] if paper else [])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in METRIC_NAMES:
    arrow = "↓" if m in LOWER_IS_BETTER else "↑"
    cells = [f"{m} {arrow}"]
    for v, lam in keys:
      st = summary[(v, lam)]
      cells.append(_cell(*st[m], st["n"]))
      if paper:
        cells.append(f"{paper[m][VARIANTS.index(v)]:g}")
    rows.append("| " + " | ".join(cells) + " |")
  return rows


def _sweep_tables(summary) -> list[str]:
  """Per variant, λ values ranked by global OT loss, then cluster matching (the paper's rule)."""
  out = []
  for v in VARIANTS:
    keys = [k for k in summary if k[0] == v and summary[k]["n"]]
    if not keys:
      continue
    keys.sort(key=lambda k: (summary[k]["global_ot_loss"][0], -summary[k]["cluster_matching"][0]))
    out += [f"## λ sweep: {v} (best first: global OT loss ↓, then cluster matching ↑)", ""]
    head = ["λ", "n"] + list(METRIC_NAMES)
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
      st = summary[k]
      cells = [f"{k[1]:g}", str(st["n"])] + [_cell(*st[m], st["n"]) for m in METRIC_NAMES]
      out.append("| " + " | ".join(cells) + " |")
    out.append("")
  return out


# ----------------------------------------------------------------------------- two sweeps


def compare_sweeps(a_dir, b_dir) -> list[dict]:
  """Per (variant, λ) and metric, two sweeps of the same runs side by side (issue 13's
  training equivalence: the same variants and seeds with ``multiscale`` vs ``dense`` OT).

  Only seeds finished in both sweeps count. ``delta`` is ``mean_b − mean_a``; ``paired`` the
  mean and sample std of the per-seed differences ``b_s − a_s`` (the same seed starts both
  from the same weights and batch order, so this isolates what differs between the sweeps);
  ``spread`` is the larger of the two sweeps' sample stds, and ``within`` is
  ``|delta| ≤ spread``: the sweeps differ by less than one seed's scatter.

  Args:
    a_dir, b_dir: ``paper_tables`` workdirs (their ``results.json``).

  Returns:
    One dict per (variant, λ, metric): ``variant, lam, metric, seeds, mean_a, std_a, mean_b,
    std_b, delta, paired_mean, paired_std, spread, within``.
  """
  runs = []
  for d in (a_dir, b_dir):
    path = pathlib.Path(d) / "results.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no results.json (run experiments.paper_tables first).")
    runs.append(
      {
        (r["variant"], r["lam"], r["seed"]): r["metrics"]
        for r in json.loads(path.read_text())["runs"]
        if r["metrics"] is not None
      }
    )
  common = sorted(set(runs[0]) & set(runs[1]), key=lambda k: (VARIANTS.index(k[0]), k[1], k[2]))
  if not common:
    raise ValueError(f"{a_dir} and {b_dir} have no finished (variant, λ, seed) in common.")
  groups: dict[tuple[str, float], list[int]] = {}
  for v, lam, seed in common:
    groups.setdefault((v, lam), []).append(seed)
  rows = []
  for (v, lam), seeds in groups.items():
    for m in METRIC_NAMES:
      a, b = ([r[(v, lam, s)][m] for s in seeds] for r in runs)
      (mean_a, std_a), (mean_b, std_b) = _mean_std(a), _mean_std(b)
      paired_mean, paired_std = _mean_std(np.subtract(b, a))
      delta, spread = mean_b - mean_a, max(std_a, std_b)
      rows.append(
        dict(
          variant=v,
          lam=lam,
          metric=m,
          seeds=seeds,
          mean_a=mean_a,
          std_a=std_a,
          mean_b=mean_b,
          std_b=std_b,
          delta=delta,
          paired_mean=paired_mean,
          paired_std=paired_std,
          spread=spread,
          within=bool(abs(delta) <= spread),
        )
      )
  return rows


def comparison_markdown(rows: Sequence[dict], label_a: str, label_b: str) -> str:
  """The rows of :func:`compare_sweeps` as a markdown table, one line per (variant, metric)."""
  head = ["variant", "metric", "seeds", label_a, label_b, "Δ mean", "paired Δ", "spread", "within"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    n = len(r["seeds"])
    lines.append(
      "| "
      + " | ".join(
        [
          f"{r['variant']} (λ={r['lam']:g})",
          r["metric"],
          ",".join(map(str, r["seeds"])),
          _cell(r["mean_a"], r["std_a"], n),
          _cell(r["mean_b"], r["std_b"], n),
          f"{r['delta']:+.3g}",
          _cell(r["paired_mean"], r["paired_std"], n),
          f"{r['spread']:.3g}",
          "yes" if r["within"] else "**no**",
        ]
      )
      + " |"
    )
  within = sum(r["within"] for r in rows)
  lines += ["", f"{within} of {len(rows)} (variant, metric) pairs within the seed spread."]
  return "\n".join(lines) + "\n"
