"""Encoders and decoders of the Global Sinkhorn Autoencoder experiments (Flax Linen).

Two architectures, as in the GSAE paper (Csiszárik et al., 2024, §5) and fixed in SPEC §4:

* "mlp": encoder 784 → 256 → 256 → 256 → z (ReLU, linear output); decoder
  z → 256 → 256 → 256 → 784 with a sigmoid output.
* "lenet": a LeNet-5 encoder (conv 6@5×5 same → ReLU → maxpool 2 → conv 16@5×5 valid → ReLU →
  maxpool 2 → 400 → 120 → 84 → z) and a mirrored decoder with nearest-neighbour upsampling
  and transposed convolutions, sigmoid output.

The encoder's output goes through a latent map that puts it where the prior lives (Sinkhorn
AutoEncoders, Patrini et al. 2019, §6): "linear" (none; the default, as in the GSAE paper),
"sphere" (L2-normalised onto the unit hypersphere), "simplex" (softmax onto the probability
simplex, for Dirichlet priors), "gaussian" (a VAE's Gaussian encoder: the last layer gives
the mean and log-variance, `Autoencoder.encode_gaussian`; `encode` returns the mean) and "vmf"
(a hyperspherical VAE's von Mises–Fisher encoder: a unit mean direction and a concentration
`κ = softplus(·) + 1`, `Autoencoder.encode_vmf`; `encode` returns the direction).

Images are `[b, 28, 28, 1]` with pixels in [0, 1]; latents are `[b, z]`. Every Dense, Conv and
ConvTranspose kernel is He-normal (fan-in, untruncated) and every bias is zero.

Linen is used functionally: `Autoencoder.encode(params, x)` is `module.apply({"params":
params}, x)`, a pure function of arrays that training code can `jax.vjp` and `lax.map` over
chunks without any module state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGE_SHAPE = (28, 28, 1)
"""Shape of one image, height × width × channels."""

ARCHS = ("mlp", "lenet")
"""Architectures accepted by `make_autoencoder`."""

HIDDEN = 256
"""Width of the MLP hidden layers."""

LATENT_MAPS = ("linear", "sphere", "simplex", "gaussian", "vmf")
"""Latent maps accepted by `make_autoencoder` (see the module docstring)."""

Params = Any
"""A pytree of parameters (the content of a Linen `variables["params"]`)."""


def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """He-normal initializer (He et al., 2015): fan-in, untruncated.

  Draws i.i.d. `N(0, 2 / fan_in)` with `fan_in = prod(shape[:-1])` (Flax kernels are laid out
  `[..., in, out]`, ConvTranspose included, so this is receptive field × input channels).
  It returns exactly the numbers of `jax.nn.initializers.variance_scaling(2.0, "fan_in",
  "normal")` (`jax.nn.initializers.he_normal` is truncated, so not that), but draws them as a
  flat vector and reshapes: with jax's default partitionable threefry, XLA:CPU compiles a 4-D
  normal draw ~7× slower (3.5 s against 0.5 s measured for a 5×5×16×6 kernel).

  Args:
    key: a `jax.random` key.
    shape: kernel shape, `[..., in, out]`.
    dtype: float dtype of the kernel.

  Returns:
    The kernel, an array of `shape`.
  """
  fan_in = math.prod(shape[:-1])
  std = jnp.sqrt(jnp.array(2.0 / fan_in, dtype))
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape) * std


bias_init = jax.nn.initializers.zeros


def _dense(features: int, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, name=name)


def _check_images(x: jax.Array) -> None:
  if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
    raise ValueError(f"images must be [b, 28, 28, 1], got shape {tuple(x.shape)}")


def _check_latents(z: jax.Array, latent_dim: int) -> None:
  if z.ndim != 2 or z.shape[1] != latent_dim:
    raise ValueError(f"latents must be [b, {latent_dim}], got shape {tuple(z.shape)}")


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 upsampling of `[b, h, w, c]` to `[b, 2h, 2w, c]`."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _latent_head(h: jax.Array, latent_dim: int, latent_map: str) -> jax.Array:
  """The encoder's last Dense layer and its latent map (module docstring)."""
  if latent_map not in LATENT_MAPS:
    raise ValueError(f"unknown latent_map {latent_map!r}; valid: {', '.join(LATENT_MAPS)}")
  width = {"gaussian": 2 * latent_dim, "vmf": latent_dim + 1}.get(latent_map, latent_dim)
  z = _dense(width)(h)
  if latent_map in ("sphere", "vmf"):
    # The floor only matters at z = 0, where the direction is undefined anyway.
    direction = z[:, :latent_dim]
    direction = direction / jnp.maximum(jnp.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
    if latent_map == "sphere":
      return direction
    # κ ≥ 1 (the choice of Davidson et al.'s S-VAE code) keeps it off the uniform posterior.
    return jnp.concatenate([direction, jax.nn.softplus(z[:, latent_dim:]) + 1.0], axis=-1)
  if latent_map == "simplex":
    return jax.nn.softmax(z, axis=-1)
  return z


class MLPEncoder(nn.Module):
  """MLP encoder 784 → 256 → 256 → 256 → latent_dim, ReLU, linear output.

  Call on `[b, 28, 28, 1]` images (flattened inside); returns `[b, latent_dim]` latents
  through `latent_map` (`[b, 2 · latent_dim]` mean and log-variance for "gaussian",
  `[b, latent_dim + 1]` direction and concentration for "vmf").
  """

  latent_dim: int
  latent_map: str = "linear"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_images(x)
    h = x.reshape(x.shape[0], -1)
    for _ in range(3):
      h = nn.relu(_dense(HIDDEN)(h))
    return _latent_head(h, self.latent_dim, self.latent_map)


class MLPDecoder(nn.Module):
  """MLP decoder latent_dim → 256 → 256 → 256 → 784, ReLU, sigmoid output.

  Call on `[b, latent_dim]` latents; returns `[b, 28, 28, 1]` images in (0, 1).
  """

  latent_dim: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    _check_latents(z, self.latent_dim)
    h = z
    for _ in range(3):
      h = nn.relu(_dense(HIDDEN)(h))
    h = _dense(28 * 28)(h)
    return nn.sigmoid(h).reshape(z.shape[0], *IMAGE_SHAPE)


class LeNetEncoder(nn.Module):
  """LeNet-5 encoder.

  conv 6@5×5 same (28×28×6) → ReLU → maxpool 2 (14×14×6) → conv 16@5×5 valid (10×10×16) →
  ReLU → maxpool 2 (5×5×16) → flatten 400 → 120 → 84 → latent_dim, ReLU between the dense
  layers, then the latent map. Call on `[b, 28, 28, 1]`; returns `[b, latent_dim]`
  (`[b, 2 · latent_dim]` for "gaussian", `[b, latent_dim + 1]` for "vmf").
  """

  latent_dim: int
  latent_map: str = "linear"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_images(x)
    conv = lambda f, pad: nn.Conv(
      f, (5, 5), padding=pad, kernel_init=kernel_init, bias_init=bias_init
    )
    h = nn.max_pool(nn.relu(conv(6, "SAME")(x)), (2, 2), strides=(2, 2))
    h = nn.max_pool(nn.relu(conv(16, "VALID")(h)), (2, 2), strides=(2, 2))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(_dense(120)(h))
    h = nn.relu(_dense(84)(h))
    return _latent_head(h, self.latent_dim, self.latent_map)


class LeNetDecoder(nn.Module):
  """LeNet-5 decoder, the encoder mirrored.

  latent_dim → 84 → 120 → 400 (ReLU between) → reshape 5×5×16 → nearest upsample ×2
  (10×10) → ReLU → transposed conv 16→6 5×5 valid (14×14) → nearest upsample ×2 (28×28) →
  ReLU → transposed conv 6→1 5×5 same (28×28×1) → sigmoid. Call on `[b, latent_dim]`;
  returns `[b, 28, 28, 1]` images in (0, 1).
  """

  latent_dim: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    _check_latents(z, self.latent_dim)
    deconv = lambda f, pad: nn.ConvTranspose(
      f, (5, 5), padding=pad, kernel_init=kernel_init, bias_init=bias_init
    )
    h = nn.relu(_dense(84)(z))
    h = nn.relu(_dense(120)(h))
    h = _dense(400)(h).reshape(z.shape[0], 5, 5, 16)
    h = deconv(6, "VALID")(nn.relu(_upsample2(h)))
    h = deconv(1, "SAME")(nn.relu(_upsample2(h)))
    return nn.sigmoid(h)


_MODULES = {"mlp": (MLPEncoder, MLPDecoder), "lenet": (LeNetEncoder, LeNetDecoder)}


class Autoencoder(NamedTuple):
  """An encoder/decoder pair with pure, functional `init`, `encode` and `decode`.

  Unpacks as `(encoder, decoder)`. The parameter pytree is
  `{"encoder": enc_params, "decoder": dec_params}`.
  """

  encoder: nn.Module
  decoder: nn.Module

  @property
  def latent_dim(self) -> int:
    return self.encoder.latent_dim

  @property
  def latent_map(self) -> str:
    return self.encoder.latent_map

  def init(self, key: jax.Array) -> dict[str, Params]:
    """Fresh parameters: `{"encoder": ..., "decoder": ...}` (He-normal kernels, 0 bias)."""
    key_enc, key_dec = jax.random.split(key)
    x = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
    z = jnp.zeros((1, self.latent_dim), jnp.float32)
    return {
      "encoder": self.encoder.init(key_enc, x)["params"],
      "decoder": self.decoder.init(key_dec, z)["params"],
    }

  def encode(self, enc_params: Params, x: jax.Array) -> jax.Array:
    """Encodes `[b, 28, 28, 1]` images to `[b, latent_dim]` latents (the mean of a
    "gaussian" encoder)."""
    z = self.encoder.apply({"params": enc_params}, x)
    return z[:, : self.latent_dim] if self.latent_map in ("gaussian", "vmf") else z

  def encode_gaussian(self, enc_params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A "gaussian" encoder's `([b, latent_dim] mean, [b, latent_dim] log-variance)`."""
    if self.latent_map != "gaussian":
      raise ValueError(f"encode_gaussian needs latent_map='gaussian', not {self.latent_map!r}")
    h = self.encoder.apply({"params": enc_params}, x)
    return h[:, : self.latent_dim], h[:, self.latent_dim :]

  def encode_vmf(self, enc_params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A "vmf" encoder's `([b, latent_dim] unit mean direction, [b] concentration κ > 1)`."""
    if self.latent_map != "vmf":
      raise ValueError(f"encode_vmf needs latent_map='vmf', not {self.latent_map!r}")
    h = self.encoder.apply({"params": enc_params}, x)
    return h[:, : self.latent_dim], h[:, self.latent_dim]

  def decode(self, dec_params: Params, z: jax.Array) -> jax.Array:
    """Decodes `[b, latent_dim]` latents to `[b, 28, 28, 1]` images in (0, 1)."""
    return self.decoder.apply({"params": dec_params}, z)


def make_autoencoder(arch: str, latent_dim: int, latent_map: str = "linear") -> Autoencoder:
  """Builds the encoder/decoder pair of an architecture.

  Args:
    arch: "mlp" or "lenet" (LeNet-5), see the module docstring.
    latent_dim: dimension z of the latent space (2 for the flower prior).
    latent_map: one of `LATENT_MAPS`; `latent_map_for_prior` picks it from a prior's name.

  Returns:
    An `Autoencoder` (a NamedTuple `(encoder, decoder)` of Linen modules).

  Raises:
    ValueError: on an unknown `arch` or a non-positive `latent_dim`.
  """
  if arch not in _MODULES:
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
  if not isinstance(latent_dim, int) or latent_dim <= 0:
    raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
  if latent_map not in LATENT_MAPS:
    raise ValueError(f"unknown latent_map {latent_map!r}; valid: {', '.join(LATENT_MAPS)}")
  enc_cls, dec_cls = _MODULES[arch]
  return Autoencoder(enc_cls(latent_dim, latent_map), dec_cls(latent_dim))


def latent_map_for_prior(prior: str) -> str:
  """The deterministic encoder's latent map that a prior needs (SAE paper §6): "sphere" for
  "hypersphere", "simplex" for "dirichlet", "linear" otherwise."""
  return {"hypersphere": "sphere", "dirichlet": "simplex"}.get(prior, "linear")


def init_params(key: jax.Array, arch: str, latent_dim: int) -> dict[str, Params]:
  """Fresh parameters of `make_autoencoder(arch, latent_dim)`: `{"encoder", "decoder"}`."""
  return make_autoencoder(arch, latent_dim).init(key)


def count_params(params: Params) -> int:
  """Total number of scalar parameters in a pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


__all__ = [
  "ARCHS",
  "IMAGE_SHAPE",
  "LATENT_MAPS",
  "Autoencoder",
  "LeNetDecoder",
  "LeNetEncoder",
  "MLPDecoder",
  "MLPEncoder",
  "count_params",
  "init_params",
  "latent_map_for_prior",
  "make_autoencoder",
]
