"""The benchmark harness, piece by piece, and the scripts on it at a tiny size.

The scripts that start subprocesses importing jax (several seconds each on the 2-core box) are
marked slow; the harness's runner is tested here on stand-in functions that start in ~0.1 s.
"""

import json
import os
import statistics
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import (
  harness,
  large_cloud,
  multiscale_accuracy,
  ot_accuracy,
  profile_multiscale,
  sinkhorn,
  softmin,
  train_step,
  warm_start,
)
from gsae_jax import memory, priors
from gsae_jax.ot import solve_divergence

# ----------------------------------------------------------------------------- harness


@pytest.mark.slow
def test_clouds_come_from_the_priors():
  x, y = harness.clouds(50, 2, "flower", "gauss", seed=3)
  kx, ky = jax.random.split(jax.random.key(3))
  assert jnp.array_equal(x, priors.flower(kx, 50))
  assert jnp.allclose(y, 0.5 + 1.5 * priors.standard_normal(ky, 50, 2))
  x, y = harness.clouds(40, 10, "standard_normal", "standard_normal", seed=0)
  assert x.shape == y.shape == (40, 10) and x.dtype == jnp.float32 and not jnp.array_equal(x, y)


def test_time_fn_compiles_then_times_warm_runs():
  t = harness.time_fn(lambda a: jnp.sum(a * a), jnp.arange(4.0), repeats=3)
  assert float(t.result) == 14.0
  assert t.compile_s > 0 and t.first_run_s > 0 and t.compiled_hwm_mb > 0
  assert len(t.warm_runs_s) == 3 and t.warm_s == statistics.median(t.warm_runs_s)
  assert t.seconds == t.warm_s
  assert t.fields() == {
    "compile_s": t.compile_s,
    "first_run_s": t.first_run_s,
    "warm_s": t.warm_s,
    "warm_runs_s": t.warm_runs_s,
  }
  # No warm runs: the first run is the time to report.
  t = harness.time_fn(lambda: 1, repeats=0, jit=False)
  assert t.compile_s is None and t.warm_s is None and t.seconds == t.first_run_s


def test_time_fn_releases_host_memory_once_after_compiling(monkeypatch):
  calls = []
  monkeypatch.setattr(memory, "release_host_memory", lambda: calls.append(1) or True)
  t = harness.time_fn(lambda a: jnp.sum(a), jnp.arange(4.0), repeats=2, release=True)
  assert float(t.result) == 6.0 and calls == [1]
  harness.time_fn(lambda a: jnp.sum(a), jnp.arange(4.0), repeats=2)
  assert calls == [1]


def test_time_fn_budget_stops_the_warm_runs():
  # 0.1 s runs, budget 0.25 s: warm runs 1 and 2 fit (0.1, 0.2), a third would make 0.3.
  t = harness.time_fn(lambda: time.sleep(0.1), repeats=10, budget_s=0.25, jit=False)
  assert 1 <= len(t.warm_runs_s) <= 3
  assert all(r >= 0.1 for r in [t.first_run_s, *t.warm_runs_s])


@pytest.fixture
def targets(tmp_path):
  """A module of stand-in benchmark functions, and the environment that makes it importable."""
  (tmp_path / "bench_targets.py").write_text(
    textwrap.dedent(
      """
      import os, time

      def ok(x):
        big = b"x" * (64 * 2**20)  # written, so resident: the child's VmHWM must show it
        return {"x": x, "env": os.environ.get("BENCH_TEST"), "n": len(big)}

      def sets_peak():
        return {"peak_rss_mb": -1.0}

      def fail():
        print("a line of progress")
        raise ValueError("boom")

      def hang():
        time.sleep(60)
      """
    )
  )
  return {"PYTHONPATH": str(tmp_path), "BENCH_TEST": "seen"}


def test_run_isolated_ok_returns_the_result_and_the_child_peak(targets):
  r = harness.run_isolated("bench_targets:ok", {"x": [1, 2]}, timeout_s=60, env=targets)
  assert r["status"] == "ok" and r["x"] == [1, 2] and r["env"] == "seen"
  assert r["peak_rss_mb"] > 64  # the child's own peak, not the parent's
  r = harness.run_isolated("bench_targets:sets_peak", {}, env=targets)
  assert r == {"status": "ok", "peak_rss_mb": -1.0}  # a peak the function reports wins


def test_run_isolated_failure_timeout_and_skip(targets):
  r = harness.run_isolated("bench_targets:fail", {}, env=targets)
  assert r["status"] == "failed: ValueError: boom" and "peak_rss_mb" in r
  t0 = time.monotonic()
  r = harness.run_isolated("bench_targets:hang", {}, timeout_s=1, env=targets)
  assert r["status"] == "timeout after 1 s" and r["peak_rss_mb"] > 0
  assert time.monotonic() - t0 < 20
  r = harness.run_isolated("bench_targets:ok", {"x": 1}, requires=("json", "no_such_mod_q"))
  assert r == {"status": "skipped: no_such_mod_q not installed"}


def test_env_info_reads_the_1min_load_average():
  def load_1m():
    with open("/proc/loadavg") as f:
      return float(f.read().split()[0])

  before, env, after = load_1m(), harness.env_info(), load_1m()
  # The kernel updates it every 5 s: what env_info read is the value before or after (to the
  # 2 decimals /proc prints), and the 5- and 15-minute averages would not generally match.
  assert min(abs(env["load_avg_1m_at_start"] - v) for v in (before, after)) < 0.006
  assert env["cpu_count"] == os.cpu_count() and env["jax"] == jax.__version__


def test_table_cells_and_missing_values():
  rows = [{"a": 1, "b": 0.123456, "c": True}, {"a": "x", "b": None}]
  md = harness.table([("A", "a"), ("B", "b"), ("C", "c"), ("2a", lambda r: r["a"] * 2)], rows)
  assert md.splitlines() == [
    "| A | B | C | 2a |",
    "|---|---|---|---|",
    "| 1 | 0.1235 | True | 2 |",
    "| x | – | – | xx |",
  ]
  assert harness.table([("B", "b")], rows, digits=2).splitlines()[2] == "| 0.12 |"
  # A string stands for columns "header=key:spec, …" (=key left out where it is the header).
  md = harness.table(["a, b=b:.2f", ("2a", lambda r: r["a"] * 2), "x = y=c"], rows[:1])
  assert md.splitlines() == [
    "| a | b | 2a | x = y |",
    "|---|---|---|---|",
    "| 1 | 0.12 | 2 | True |",
  ]


def test_flags_are_typed_by_their_defaults():
  p = harness.parser("A script.\n\nMore.", n=[1, 2], blur=0.5, name_=("x", "help", ("x", "y")))
  harness.flags(p, on=False, files=[], kinds=(["a"], None, ["a", "b"]))
  args = harness.parse(p, ["--n", "3", "--blur", "2", "--on", "--kinds", "b", "a"], "stem")
  assert vars(args) == {
    "n": [3],
    "blur": 2.0,
    "name_": "x",
    "on": True,
    "files": [],
    "kinds": ["b", "a"],
    "out": "benchmarks/results",
    "name": "stem",
  }
  assert p.description == "A script." and p.parse_args(["--files", "u", "v"]).files == ["u", "v"]
  with pytest.raises(SystemExit):
    p.parse_args(["--name_", "z"])  # not a choice


def test_merge_replaces_rows_of_the_same_key_and_keeps_the_runs():
  key = lambda r: (r["n"], r["m"])
  run = lambda tag, rows: {"env": {"tag": tag}, "args": {"tag": tag}, "rows": rows}
  old = run("old", [{"n": 2, "m": "a", "v": 1}, {"n": 1, "m": "a", "v": 1}])
  new = run("new", [{"n": 1, "m": "a", "v": 2}, {"n": 1, "m": "b", "v": 2}])
  merged = harness.merge(old, new, key)
  assert [(r["n"], r["m"], r["v"]) for r in merged["rows"]] == [
    (1, "a", 2),
    (1, "b", 2),
    (2, "a", 1),
  ]
  assert merged["env"] == {"tag": "new"}
  assert [r["env"]["tag"] for r in merged["runs"]] == ["old", "new"]
  again = harness.merge(merged, run("third", []), key)
  assert [r["args"]["tag"] for r in again["runs"]] == ["old", "new", "third"]
  assert again["rows"] == merged["rows"]


def test_save_outputs(tmp_path):
  payload = {"rows": [{"v": jnp.float32(0.5)}]}
  assert harness.save(tmp_path / "sub", "x", payload, lambda p: "| a |\n\n") is payload
  assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"rows": [{"v": 0.5}]}
  assert (tmp_path / "sub" / "x.md").read_text() == "| a |\n"


# ----------------------------------------------------------------------------- scripts


def test_committed_tables_re_render_from_their_json():
  # large_cloud.md was written by an older script; sinkhorn_ab_issue14 by the since-removed
  # ab_compare. warm_start's command line is not in its JSON: it is read off the table's end.
  results = Path(__file__).parents[1] / "benchmarks" / "results"
  scripts = [
    multiscale_accuracy,
    ot_accuracy,
    profile_multiscale,
    sinkhorn,
    softmin,
    train_step,
    warm_start,
  ]
  skip = ("large_cloud", "sinkhorn_ab_issue14")
  paths = [p for p in sorted(results.glob("*.json")) if p.stem not in skip]
  assert len(paths) == 17
  for path in paths:
    script = next(m for m in scripts if path.stem.startswith(m.__name__.split(".")[1]))
    md = path.with_suffix(".md").read_text()
    command = [md.rstrip().splitlines()[-1].strip("`")] if script is warm_start else []
    assert script.markdown(harness.load(path), *command).rstrip() + "\n" == md, path.name


@pytest.mark.slow
def test_warm_start_benchmark_tiny(tmp_path):
  argv = ["--n", "120", "--steps", "2", "--warm_iters", "1", "--regimes", "late"]
  argv += ["--backend", "dense", "--blur", "0.3", "--ref_max_iter", "50", "--out", str(tmp_path)]
  warm_start.main(argv)
  saved = json.loads((tmp_path / "warm_start.json").read_text())
  assert [r["method"] for r in saved["rows"]] == ["cold", "warm_1"]
  for r in saved["rows"]:
    assert r["median_s"] > 0 and r["ref_updates"] <= 50
    assert r["value_rel_err"] == pytest.approx(abs(r["value_last"] / r["ref_value"] - 1))
  md = (tmp_path / "warm_start.md").read_text()
  assert "| late | redrawn | warm_1 | " in md
  assert md.rstrip().endswith(f"`python -m benchmarks.warm_start {' '.join(argv)}`")


@pytest.mark.slow
def test_train_step_benchmark_tiny(tmp_path):
  train_step.main(["--n", "200", "--variants", "local", "--steps", "1", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
  assert [r["variant"] for r in rows] == ["local"] and rows[0]["n"] == 200
  assert rows[0]["status"] == "ok" and rows[0]["steps_per_s"] == 1 / rows[0]["step_s"]
  assert (
    rows[0]["peak_rss_with_parts_mb"] >= rows[0]["peak_rss_mb"] > rows[0]["rss_after_imports_mb"]
  )
  assert (tmp_path / "train_step.md").read_text().startswith("| variant | n |")
  # --pretrain: the timed steps start from trained parameters, so their loss is lower.
  argv = ["--n", "200", "--variants", "local", "--steps", "1", "--pretrain", "30"]
  train_step.main([*argv, "--out", str(tmp_path), "--name", "pre"])
  (pre,) = json.loads((tmp_path / "pre.json").read_text())["rows"]
  assert pre["status"] == "ok" and pre["loss"] < 0.9 * rows[0]["loss"]
  assert "from the parameters of 30 `local` steps" in (tmp_path / "pre.md").read_text()
  # Warm-started OT needs the prior sample kept between steps: --resample_freq reaches the step.
  argv = ["--n", "200", "--variants", "minibatch_global", "--steps", "2", "--ot_warm_iters", "1"]
  argv += ["--resample_freq", "4", "--ot_coarse", "accurate"]
  train_step.main([*argv, "--out", str(tmp_path), "--name", "warm"])
  (warm,) = json.loads((tmp_path / "warm.json").read_text())["rows"]
  assert warm["status"] == "ok" and warm["resample_freq"] == 4 and warm["ot_warm_iters"] == 1
  # The coarse grids reach the row and its note (the OT part is timed with the step's grids).
  assert (
    warm["ot_coarse"] == "accurate" and "ot_coarse=accurate" in (tmp_path / "warm.md").read_text()
  )


def test_profile_scopes_from_hlo_text_and_exclusive_nested_times():
  hlo = textwrap.dedent("""
    %fusion.1 = f32[8] fusion(%p), metadata={op_name="jit(f)/coarse/grid64/select_tiles/add"}
    ROOT %while.2 = (s32[]) while(%t), metadata={op_name="jit(f)/jvp(fine)/while"}
    %cond.3 = f32[] conditional(%q), metadata={op_name="jit(f)/transpose(jvp(x))/mul"}
  """)
  # jvp(fine) is not the scope `fine` itself: only whole path components count.
  scopes = profile_multiscale.op_scopes(hlo)
  assert scopes == {"fusion.1": "coarse/grid64/select_tiles", "while.2": "other", "cond.3": "other"}

  def ev(op, ts, dur, tid=1):
    return {"ph": "X", "pid": 0, "tid": tid, "ts": ts, "dur": dur, "args": {"hlo_op": op}}

  scopes = {"loop": "fine", "inner": "other", "sel": "fine/select_tiles", "top": "other"}
  events = [
    ev("loop", 0, 100),  # 100 µs, of which 30 + 20 in nested thunks
    ev("inner", 10, 30),  # no scope: inherits `fine`
    ev("sel", 50, 20),
    ev("top", 200, 40),
    ev("inner", 0, 7, tid=2),  # another thread, nothing around it: `other`
    {"ph": "X", "pid": 0, "tid": 1, "ts": 0, "dur": 999, "args": {}},  # not a thunk
  ]
  times = profile_multiscale.scope_times(events, scopes)
  assert times == pytest.approx({"fine": 80e-6, "fine/select_tiles": 20e-6, "other": 47e-6})
  with pytest.raises(RuntimeError, match="no XLA thunk events"):
    profile_multiscale.scope_times(events[-1:], scopes)


@pytest.mark.slow
def test_profile_multiscale_tiny(tmp_path):
  argv = ["--n", "1500", "--target", "flower", "--coarse", "fast", "--out", str(tmp_path)]
  payload = profile_multiscale.main(argv)
  x, y = harness.clouds(1500, 2, "flower", "flower", 0)
  kw = dict(blur=0.05, scaling=0.7, backend="multiscale", coarse="fast")
  assert payload["value"] == pytest.approx(float(solve_divergence(x, y, **kw).value), rel=1e-6)
  times = {r["scope"]: r["seconds"] for r in payload["rows"]}
  # Every named scope of the backend is found in the compiled module and the trace.
  for s in ("coarse/grid64", "coarse/grid128", "coarse/grid256", "jump", "fine", "extrapolate"):
    assert times[s] > 0 and times[f"{s}/select_tiles"] > 0, s
  assert sum(r["share"] for r in payload["rows"]) == pytest.approx(1.0, abs=1e-9)
  md = (tmp_path / "profile_multiscale.md").read_text()
  assert md.startswith("# Multiscale solve by named scope: flower vs flower, n = 1500")


@pytest.mark.slow
def test_large_cloud_benchmark_tiny(tmp_path):
  large_cloud.main(["--sizes", "200", "--repeats", "1", "--out", str(tmp_path)])
  (row,) = json.loads((tmp_path / "large_cloud.json").read_text())["rows"]
  assert row["mode"] == "divergence" and row["grad_finite"] and len(row["warm_runs_s"]) == 1
  assert row["net_rss_mb"] == row["peak_rss_mb"] - row["baseline_peak_rss_mb"]
  assert row["peak_rss_mb"] >= row["rss_after_compile_mb"] >= row["rss_after_inputs_mb"]
  md = (tmp_path / "large_cloud.md").read_text()
  assert "`python -m benchmarks.large_cloud --sizes 200 --repeats 1 --out" in md
  assert "\n| 200 | " in md


@pytest.mark.slow
def test_ot_accuracy_benchmark_tiny(tmp_path):
  payload = ot_accuracy.main(
    ["--n", "60", "--blurs", "0.3", "--scalings", "0.7", "--check_n", "40", "--warm_n", "60"]
    + ["--warm_eps", "0.1", "--warm_deltas", "0.01", "--repeats", "1", "--out", str(tmp_path)]
  )
  saved = json.loads((tmp_path / "ot_accuracy.json").read_text())
  assert saved["command"] == payload["command"] and saved["config"]["n"] == 60
  rows = saved["annealed"]["rows"]
  assert [r["case"] for r in rows] == ["flower_vs_gaussian", "flower_vs_flower"]
  # float32 and float64 run the same annealed schedule; the converged reference is apart.
  assert all(abs(r["annealed_f32"] - r["annealed_f64"]) < 1e-4 * abs(r["converged"]) for r in rows)
  # The term-by-term reference and the divergence run to the same tolerance agree.
  assert all(c["abs_diff"] < 1e-4 for c in saved["annealed"]["cross_checks"])
  (w,) = saved["warm"]["rows"]
  assert w["warm_iters"] < w["cold_perturbed_iters"]  # the point of warm starts
  md = (tmp_path / "ot_accuracy.md").read_text()
  assert md.count("\n| flower_vs_") == 6 and "## (b) Warm start" in md


@pytest.mark.slow
def test_ot_accuracy_reference_cache_resumes(tmp_path, capsys):
  # --ref_cache: the first run stores each converged reference, a rerun loads it unchanged.
  argv = ["--parts", "annealed", "--n", "60", "--blurs", "0.3", "--scalings", "0.7"]
  argv += ["--check_n", "40", "--repeats", "1", "--ref_cache", str(tmp_path / "refs")]
  first = ot_accuracy.main([*argv, "--out", str(tmp_path / "a")])["annealed"]
  assert len(list((tmp_path / "refs").glob("*.npz"))) == 4  # two cases, each + its cross-check
  capsys.readouterr()
  again = ot_accuracy.main([*argv, "--out", str(tmp_path / "b")])["annealed"]
  assert capsys.readouterr().err.count("(reference from ") == 4
  assert again["references"] == first["references"]
  assert [r["converged"] for r in again["rows"]] == [r["converged"] for r in first["rows"]]
