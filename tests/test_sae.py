"""The Sinkhorn AutoEncoders table trainer: its losses against independent references, a tiny
run end to end (artefacts, resume), and the sweep's refusals."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from gsae_jax import classifier, vmf
from gsae_jax.data import Dataset
from gsae_jax.training import sae


def test_gaussian_kl_matches_scipy():
  # KL(q ‖ N(0, I)) = cross-entropy − entropy, from scipy's Gaussian entropy (rtol 1e-5).
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(4, 3)), rng.normal(scale=0.5, size=(4, 3))
  ref = []
  for m, lv in zip(mean, logvar, strict=True):
    var = np.exp(lv)
    cross = 0.5 * (3 * np.log(2 * np.pi) + var.sum() + m @ m)
    ref.append(cross - stats.multivariate_normal(m, np.diag(var)).entropy())
  got = sae.gaussian_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  np.testing.assert_allclose(got, np.mean(ref), rtol=1e-5, atol=1e-6)


def _sharp_numpy(x, y, eps, n_iter):
  """Patrini's sharp loss with the paper's cost ‖x − y‖², float64: unrolled log-domain Sinkhorn
  from g = 0 and Altschuler et al.'s (2017) rounding (Algorithm 2), then ⟨R, C⟩."""

  def w(p, q):
    c = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    a, b = np.full(len(p), 1 / len(p)), np.full(len(q), 1 / len(q))
    g = np.zeros(len(q))
    for _ in range(n_iter):
      f = -eps * logsumexp((g[None, :] - c) / eps + np.log(b)[None, :], axis=1)
      g = -eps * logsumexp((f[:, None] - c) / eps + np.log(a)[:, None], axis=0)
    r = np.exp((f[:, None] + g[None, :] - c) / eps) * a[:, None] * b[None, :]
    r = r * np.minimum(a / r.sum(1), 1)[:, None]
    r = r * np.minimum(b / r.sum(0), 1)[None, :]
    ea, eb = a - r.sum(1), b - r.sum(0)
    r = r + np.outer(ea, eb) / max(ea.sum(), 1e-300)
    return (r * c).sum()

  return w(x, y) - 0.5 * w(x, x) - 0.5 * w(y, y)


@pytest.mark.parametrize("row", ["sae", "sae_sphere"])
def test_sae_rows_use_the_papers_cost_and_epsilon(row):
  # The engine's cost is ½‖·‖²: the row's regulariser must equal the sharp loss on the paper's
  # ‖·‖² with the paper's ε (rtol 1e-4 in float32 against float64).
  config = sae.SAEConfig(row=row, sharp_iters=50)
  rng = np.random.default_rng(1)
  z = rng.normal(size=(30, 8)).astype(np.float32)
  p = np.asarray(sae.make_prior(config)(jax.random.key(0), 30))
  z = z / np.linalg.norm(z, axis=1, keepdims=True) if row == "sae_sphere" else z
  got = sae.make_regularizer(config)(jnp.asarray(z), jnp.asarray(p), None)
  eps = sae.ROWS[row].settings["epsilon"]
  ref = _sharp_numpy(z.astype(np.float64), p.astype(np.float64), eps, 50)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_models_follow_the_prior():
  assert sae.make_model(sae.SAEConfig(row="vae")).latent_map == "gaussian"
  assert sae.make_model(sae.SAEConfig(row="wae_sphere")).latent_map == "sphere"
  dirichlet = sae.SAEConfig(row="sae_dirichlet")
  assert sae.make_model(dirichlet).latent_map == "simplex"
  assert sae.make_model(dirichlet).latent_dim == 16
  assert sae.make_model(sae.SAEConfig(row="wae")).latent_map == "linear"
  assert sae.make_model(sae.SAEConfig(row="hvae")).latent_map == "vmf"


@pytest.mark.slow  # compiles the MLP autoencoder
def test_hvae_loss_is_reconstruction_plus_the_vmf_kl():
  # The HVAE row: summed squared error of the decoded vMF sample + β·KL(vMF ‖ uniform on S⁷),
  # the KL from scipy's von Mises–Fisher entropy (float32 against float64).
  config = sae.SAEConfig(row="hvae")
  model = sae.make_model(config)
  params = model.init(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 28, 28, 1)), jnp.float32)
  key = jax.random.key(1)
  value, (d_val, r_val) = sae.make_loss(config, model)(params, x, key)
  mu, kappa = (np.asarray(a, np.float64) for a in model.encode_vmf(params["encoder"], x))
  np.testing.assert_allclose(np.linalg.norm(mu, axis=1), 1.0, rtol=1e-6)
  assert np.all(kappa >= 1.0)
  log_area = np.log(2.0) + 4 * np.log(np.pi) - np.log(6.0)  # |S⁷| = 2π⁴/Γ(4)
  kl = [
    log_area - stats.vonmises_fisher(m / np.linalg.norm(m), k).entropy()
    for m, k in zip(mu, kappa, strict=True)
  ]
  # atol: float32 sums of terms of size ≈ 5 (log|S⁷| = 3.5, log I₃) for a KL of ≈ 0.1.
  np.testing.assert_allclose(r_val, np.mean(kl), rtol=1e-5, atol=1e-5)
  z = vmf.sample(key, jnp.asarray(mu, jnp.float32), jnp.asarray(kappa, jnp.float32))
  recon = np.asarray(model.decode(params["decoder"], z), np.float64)
  d_ref = np.mean(np.sum((recon - np.asarray(x)) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(d_val, d_ref, rtol=1e-5)
  np.testing.assert_allclose(value, d_ref + config.resolved_beta * np.mean(kl), rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"row": "nope"}, "`row` must be one of"),
    ({"row": "hae", "batch_size": 6000}, "Hungarian"),
    ({"beta": -1.0}, "`beta` must be"),
    ({"epochs": 0}, "`epochs` must be a positive"),
  ],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sae.SAEConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny():
  rng = np.random.default_rng(0)
  labels = np.arange(240) % 10
  imgs = rng.uniform(size=(240, 28, 28, 1)).astype(np.float32) * 0.2
  for c in range(10):  # a class-dependent bright square, so that the classifier can learn
    imgs[labels == c, 2 * c : 2 * c + 6, 4:10] = 1.0
  data = Dataset(imgs[:200], labels[:200], imgs[200:], labels[200:])
  clf = classifier.train_classifier(
    jax.random.key(0), data.train_images, data.train_labels, steps=20
  )
  return data, clf


@pytest.mark.slow
def test_tiny_run_writes_its_artefacts_and_resumes(tmp_path, tiny):
  data, clf = tiny
  tmp_path = tmp_path / "w2gae_seed0"  # the sweep's layout, for the sample sheet below
  config = sae.SAEConfig(row="w2gae", epochs=2, batch_size=50, eval_every=4)
  final = sae.train_and_evaluate(config, str(tmp_path), clf_params=clf, data=data)
  assert set(final) == set(sae.METRICS) and all(np.isfinite(v) for v in final.values())
  for name in ("config.json", "metrics.json", "metrics.jsonl", "samples.png"):
    assert (tmp_path / name).is_file()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [4, 8]
  # The same run again resumes at its last step: no training, the same final record.
  again = sae.train_and_evaluate(config, str(tmp_path), clf_params=clf, data=data)
  assert again == final
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
  # The sweep's sample sheet restores each finished run ("w2gae" here; "wae" never ran).
  sheet = sae.sample_sheet(tmp_path.parent, ["w2gae", "wae"], seed=0, per_row=4)
  assert sheet.is_file() and sheet.parent == tmp_path.parent
  with pytest.raises(ValueError, match="other settings"):
    sae.train_and_evaluate(
      sae.SAEConfig(row="wae", epochs=2, batch_size=50), str(tmp_path), clf_params=clf, data=data
    )


def test_run_table_refuses_empty_and_repeated(tmp_path):
  base = sae.SAEConfig()
  with pytest.raises(ValueError, match="`rows` must not be empty"):
    sae.run_table(base, tmp_path, rows=())
  with pytest.raises(ValueError, match="repeats"):
    sae.run_table(base, tmp_path, rows=("wae", "wae"))
  with pytest.raises(ValueError, match="repeats"):
    sae.run_table(base, tmp_path, seeds=(0, 0))
  with pytest.raises(ValueError, match="unknown rows"):
    sae.run_table(base, tmp_path, rows=("xyz",))


def test_report_tables_finished_runs_and_lists_failed_ones(tmp_path):
  ok = {"mmd_x100": 1.0, "reconstruction": 8.0, "fid_like": 20.0}
  ok2 = {"mmd_x100": 3.0, "reconstruction": 10.0, "fid_like": 30.0}
  path = sae.write_report(
    tmp_path, {"wae": {0: ok, 1: ok2, 2: "FloatingPointError: nan"}}, reference=3.1415
  )
  text = path.read_text()
  row = next(line for line in text.splitlines() if line.startswith("| wae "))
  # n = 2 finished seeds; mean ± sample std of (1, 3) = 2 ± √2.
  assert "| 2 | 2 ± 1.4 | 9 ± 1.4 | 25 ± 7.1 | 0.5 | 7.07 | 24.4 |" in row
  assert "wae seed 2: FloatingPointError: nan" in text
  assert "FID-like of real training images against the test set: 3.14 (" in text


@pytest.mark.slow
def test_entry_point_rejects_bad_flags(tmp_path):
  base = [sys.executable, "-m", "experiments.sae_mnist", f"--workdir={tmp_path}"]
  for flag, word in (
    ("--rows=abc", "unknown rows ['abc']"),
    ("--seeds=0,0", "`seeds` repeats [0]"),
    ("--seeds=x", "--seeds must be integers"),
    ("--beta=-1", "`beta` must be"),
  ):
    out = subprocess.run(base + [flag], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and word in out.stderr, (flag, out.stderr[-500:])
  assert not (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_dirichlet_row_decodes_the_simplex_vertices(tmp_path, tiny):
  data, clf = tiny
  config = sae.SAEConfig(row="sae_dirichlet", epochs=1, batch_size=50, eval_every=4, sharp_iters=5)
  sae.train_and_evaluate(config, str(tmp_path), clf_params=clf, data=data)
  assert (tmp_path / "vertices.png").is_file()  # one decoded image per vertex of the 16-simplex
  height, width = matplotlib.image.imread(tmp_path / "vertices.png").shape[:2]
  assert width > 5 * height
