"""Autoencoder architectures: exact parameter counts, shapes, He-normal init statistics, errors.

Parameter counts and shapes use `jax.eval_shape` (no compile); one real, jitted init per
architecture is shared by the tests through module-scoped fixtures.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import models

KEY = jax.random.key(0)


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _shapes(arch, latent_dim):
  ae = models.make_autoencoder(arch, latent_dim)
  return jax.eval_shape(ae.init, KEY)


@pytest.fixture(scope="module", params=models.ARCHS)
def initialised(request):
  ae = models.make_autoencoder(request.param, 2)
  return request.param, ae, jax.jit(ae.init)(KEY)


def test_mlp_parameter_counts():
  shapes = _shapes("mlp", 2)
  # 784*256+256 + 2*(256*256+256) + 256*2+2
  assert _count(shapes["encoder"]) == 333_058
  # 2*256+256 + 2*(256*256+256) + 256*784+784
  assert _count(shapes["decoder"]) == 333_840
  # The latent dimension only changes the encoder's last and the decoder's first layer.
  shapes8 = _shapes("mlp", 8)
  assert _count(shapes8["encoder"]) == 333_058 + 6 * 257
  assert _count(shapes8["decoder"]) == 333_840 + 6 * 256


def test_lenet_parameter_counts():
  shapes = _shapes("lenet", 2)
  # conv 1->6 (156), conv 6->16 (2416), 400->120 (48120), 120->84 (10164), 84->2 (170)
  assert _count(shapes["encoder"]) == 61_026
  # 2->84 (252), 84->120 (10200), 120->400 (48400), convT 16->6 (2406), convT 6->1 (151)
  assert _count(shapes["decoder"]) == 61_409
  assert _count(shapes) == 122_435
  assert shapes["decoder"]["ConvTranspose_0"]["kernel"].shape == (5, 5, 16, 6)
  assert shapes["decoder"]["ConvTranspose_1"]["kernel"].shape == (5, 5, 6, 1)


@pytest.mark.slow
def test_forward_shapes_and_range(initialised):
  arch, ae, params = initialised
  assert models.count_params(params) == _count(_shapes(arch, 2))
  x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
  z_far = jnp.array([[0.0, 0.0], [3.0, 0.0], [-20.0, 25.0]])  # incl. far outside the prior

  @jax.jit
  def forward(params, x, z_far):
    z = ae.encode(params["encoder"], x)
    return z, ae.decode(params["decoder"], jnp.concatenate([z, z_far]))

  z, x_hat = forward(params, x, z_far)
  assert z.shape == (5, 2) and z.dtype == jnp.float32
  assert x_hat.shape == (8, 28, 28, 1) and x_hat.dtype == jnp.float32
  assert np.all(np.isfinite(z))
  assert float(x_hat[:5].min()) > 0.0 and float(x_hat[:5].max()) < 1.0
  assert float(x_hat.min()) >= 0.0 and float(x_hat.max()) <= 1.0  # sigmoid may round to 0/1
  # Different images give different latents (the encoder is not degenerate at init).
  assert float(jnp.abs(z[0] - z[1]).max()) > 1e-4


def test_he_normal_init_statistics(initialised):
  _, _, params = initialised
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    leaf = np.asarray(leaf, np.float64)
    if name.endswith("['bias']"):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
      continue
    expected = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))  # fan-in: all axes but out
    # Relative standard error of a std estimate from N draws is 1/sqrt(2N): tolerance is
    # 10% for the big kernels, 4 standard errors for the small conv kernels.
    rtol = max(0.10, 4 / math.sqrt(2 * leaf.size))
    np.testing.assert_allclose(leaf.std(), expected, rtol=rtol, err_msg=name)
    assert abs(leaf.mean()) < 4 * expected / math.sqrt(leaf.size), name


def test_first_layer_is_untruncated_he_normal(initialised):
  arch, _, params = initialised
  first = params["encoder"]["Dense_0" if arch == "mlp" else "Conv_0"]["kernel"]
  if arch == "lenet":  # 150 weights only: use the 400x120 dense layer for tail statistics
    first = params["encoder"]["Dense_0"]["kernel"]
  w = np.asarray(first, np.float64)
  std = math.sqrt(2.0 / w.shape[0])
  np.testing.assert_allclose(w.std(), std, rtol=0.10)
  # Untruncated: P(|w| > 2 sigma) = 4.55% (a [-2, 2] truncated normal has none).
  tail = np.mean(np.abs(w) > 2 * std)
  np.testing.assert_allclose(tail, 0.0455, rtol=0.15)


def test_kernel_init_matches_jax_variance_scaling():
  # Same numbers as the reference initializer: the flat draw + reshape is only a compile-time
  # optimisation (see models.kernel_init).
  reference = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  both = jax.jit(lambda key: (models.kernel_init(key, (40, 30)), reference(key, (40, 30))))
  ours, theirs = both(jax.random.key(7))  # one compile for both
  np.testing.assert_array_equal(ours, theirs)


def test_init_params_and_unpacking():
  ae = models.make_autoencoder("mlp", 3)
  encoder, decoder = ae
  assert isinstance(encoder, models.MLPEncoder) and isinstance(decoder, models.MLPDecoder)
  assert ae.latent_dim == 3
  shapes = jax.eval_shape(lambda k: models.init_params(k, "mlp", 3), KEY)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
    jax.eval_shape(ae.init, KEY)
  )
  assert shapes["encoder"]["Dense_3"]["kernel"].shape == (256, 3)


def test_unknown_arch_lists_valid_names():
  with pytest.raises(ValueError, match="mlp, lenet"):
    models.make_autoencoder("resnet", 2)


@pytest.mark.parametrize("latent_dim", [0, -1, 2.0])
def test_bad_latent_dim(latent_dim):
  with pytest.raises(ValueError, match="latent_dim"):
    models.make_autoencoder("mlp", latent_dim)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_bad_input_shapes(arch):
  ae = models.make_autoencoder(arch, 2)
  shapes = jax.eval_shape(ae.init, KEY)
  with pytest.raises(ValueError, match=r"\[b, 28, 28, 1\]"):
    jax.eval_shape(ae.encode, shapes["encoder"], jnp.zeros((4, 784)))
  with pytest.raises(ValueError, match=r"\[b, 2\]"):
    jax.eval_shape(ae.decode, shapes["decoder"], jnp.zeros((4, 3)))


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.slow
def test_latent_maps_normalise_the_linear_output(arch):
  # Same parameters (the maps add none): sphere and simplex are the linear output normalised,
  # checked against numpy; "gaussian" has one layer twice as wide whose first half is the mean.
  x = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
  lin = models.make_autoencoder(arch, 5)
  params = lin.init(KEY)
  z = np.asarray(lin.encode(params["encoder"], x), np.float64)
  sphere = models.make_autoencoder(arch, 5, "sphere").encode(params["encoder"], x)
  np.testing.assert_allclose(sphere, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5)
  simplex = models.make_autoencoder(arch, 5, "simplex").encode(params["encoder"], x)
  e = np.exp(z - z.max(axis=1, keepdims=True))
  np.testing.assert_allclose(simplex, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)

  gauss = models.make_autoencoder(arch, 5, "gaussian")
  gparams = gauss.init(KEY)
  last_width = {"mlp": models.HIDDEN, "lenet": 84}[arch]
  assert _count(gparams["encoder"]) == _count(params["encoder"]) + 5 * (last_width + 1)
  mean, logvar = gauss.encode_gaussian(gparams["encoder"], x)
  assert mean.shape == logvar.shape == (6, 5)
  np.testing.assert_array_equal(gauss.encode(gparams["encoder"], x), mean)
  assert gauss.decode(gparams["decoder"], mean).shape == (6, 28, 28, 1)
  with pytest.raises(ValueError, match="needs latent_map='gaussian'"):
    lin.encode_gaussian(params["encoder"], x)

  # "vmf": one extra output, κ = softplus(raw) + 1, and the first 5 normalised (numpy).
  vmf_model = models.make_autoencoder(arch, 5, "vmf")
  vparams = vmf_model.init(KEY)
  assert _count(vparams["encoder"]) == _count(params["encoder"]) + (last_width + 1)
  raw = np.asarray(models.make_autoencoder(arch, 6).encode(vparams["encoder"], x), np.float64)
  mu, kappa = vmf_model.encode_vmf(vparams["encoder"], x)
  direction = raw[:, :5] / np.linalg.norm(raw[:, :5], axis=1, keepdims=True)
  np.testing.assert_allclose(mu, direction, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(kappa, np.log1p(np.exp(raw[:, 5])) + 1.0, rtol=1e-5)
  np.testing.assert_array_equal(vmf_model.encode(vparams["encoder"], x), mu)
  with pytest.raises(ValueError, match="needs latent_map='vmf'"):
    gauss.encode_vmf(gparams["encoder"], x)


def test_latent_map_errors_and_prior_defaults():
  with pytest.raises(ValueError, match="unknown latent_map 'cube'.*sphere"):
    models.make_autoencoder("mlp", 2, "cube")
  assert models.latent_map_for_prior("hypersphere") == "sphere"
  assert models.latent_map_for_prior("dirichlet") == "simplex"
  assert models.latent_map_for_prior("flower") == "linear"
