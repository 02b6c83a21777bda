"""training.equivariance: EQ-VAE's transforms against torch (F.interpolate + torch.rot90), the term
for an autoencoder that commutes with them, the draw's determinism and distribution, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import feature_nets
from vae_scale.config import diffusability_rules
from vae_scale.errors import ConfigError
from vae_scale.training import equivariance as eq

LATENT = 32  # A 256 px image at f8, as EQ-VAE fine-tunes SD's VAE.


def _torch_tau(x_nhwc: np.ndarray, scale: float, k: int) -> np.ndarray:
  """EQ-VAE's tau on NCHW: interpolate(scale_factor, bilinear, align_corners=False), then
  rot90(k, dims=[-1, -2])."""
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).double()
  x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
  return torch.rot90(x, k=k, dims=[-1, -2]).numpy().transpose(0, 2, 3, 1)


def test_transforms_match_eq_vae():
  images = feature_nets.photos(8 * LATENT)  # [3, 256, 256, 3]
  latents = np.random.default_rng(0).normal(size=(3, LATENT, LATENT, 4)).astype(np.float32)
  pair = jax.jit(eq.transform_pair, static_argnums=2)
  for scale in (8 / 32, 9 / 32, 0.5, 31 / 32, 1.0):
    for k in range(4):
      z_t, x_t = pair(latents, images, scale, jnp.int32(k))  # Traced rotation.
      m = round(scale * LATENT)
      assert z_t.shape == (3, m, m, 4) and x_t.shape == (3, 8 * m, 8 * m, 3)
      np.testing.assert_allclose(np.asarray(z_t), _torch_tau(latents, scale, k), atol=1e-5)
      np.testing.assert_allclose(np.asarray(x_t), _torch_tau(images, scale, k), atol=1e-5)
  # A static rotation gives the same, and works on non-square inputs.
  np.testing.assert_array_equal(np.asarray(eq.rotate(images, 3)),
                                np.asarray(eq.rotate(images, jnp.int32(3))))
  wide = images[:, :128]
  np.testing.assert_allclose(np.asarray(eq.rotate(wide, 1)), _torch_tau(wide, 1.0, 1), atol=0)
  with pytest.raises(ValueError, match="square"):
    eq.rotate(wide, jnp.int32(1))


def _linear_autoencoder(positional: bool):
  """f = 1 'autoencoder': E(x) = x A (+ a fixed random pattern P_n over the n x n positions),
  D(z) = (z - P_m) A^-1, so D(E(x)) = x exactly. A channel mix commutes with every spatial
  transform; the pattern does not."""
  a = np.array([[1.0, 0.3, -0.2], [0.1, 0.9, 0.4], [-0.3, 0.2, 1.1]], np.float32)
  a_inv = np.linalg.inv(a).astype(np.float32)

  def pattern(n):
    return 0.5 * jax.random.normal(jax.random.key(n), (1, n, n, 1)) * (1.0 if positional else 0.0)

  encode = lambda x: jnp.einsum("bhwc,cd->bhwd", x, a) + pattern(x.shape[1])
  decode = lambda z: jnp.einsum("bhwc,cd->bhwd", z - pattern(z.shape[1]), a_inv)
  return encode, decode


def _all_equivariant_draws(cfg):
  return [eq.Transform(jnp.int32(eq.EQUIVARIANT), jnp.int32(i), jnp.int32(k))
          for i in range(len(cfg.scales)) for k in cfg.rotations]


def test_commuting_autoencoder_has_zero_term():
  cfg = eq.EquivarianceConfig(scales=(0.25, 9 / 32, 0.5, 0.75, 31 / 32, 1.0),
                              rotations=(0, 1, 2, 3))
  x = jnp.asarray(feature_nets.photos(LATENT))
  l1 = lambda target, recon: jnp.mean(jnp.abs(target - recon))
  for positional in (False, True):
    encode, decode = _linear_autoencoder(positional)
    np.testing.assert_allclose(np.asarray(decode(encode(x))), np.asarray(x), atol=1e-5)
    term = jax.jit(lambda t, z, x: eq.equivariance_loss(t, cfg, z, x, decode, l1))
    draws = _all_equivariant_draws(cfg)
    values = np.array([float(term(t, encode(x), x)) for t in draws])
    if positional:  # Reconstructs perfectly, is not equivariant: the term sees it (but for the
      # identity, scale 1 without rotation, the last draw).
      assert int(draws[-4].rotation) == 0 and cfg.scales[int(draws[-4].scale_index)] == 1.0
      assert values[-4] < 1e-6 and np.delete(values, -4).min() > 1e-2, values
    else:
      assert values.max() < 1e-6, values
    for mode in (eq.PLAIN, eq.LOW_RES):  # Not an equivariance step: exactly 0.
      t = eq.Transform(jnp.int32(mode), jnp.int32(1), jnp.int32(1))
      assert float(term(t, encode(x), x)) == 0.0


def test_gradient_flows_through_the_term():
  cfg = eq.EquivarianceConfig(scales=(0.5,), rotations=(1,))
  x = jnp.asarray(feature_nets.photos(16))
  _, decode = _linear_autoencoder(False)
  t = eq.Transform(jnp.int32(eq.EQUIVARIANT), jnp.int32(0), jnp.int32(1))
  loss = lambda w: eq.equivariance_loss(
      t, cfg, jnp.einsum("bhwc,cd->bhwd", x, w), x, decode,
      lambda target, recon: jnp.mean(jnp.square(target - recon)))
  g = np.asarray(jax.grad(loss)(jnp.eye(3) * 1.1))
  assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_draw_is_deterministic_in_the_key_and_distributed_as_eq_vae():
  cfg = eq.EquivarianceConfig()
  draw = jax.jit(lambda key: eq.sample_transform(key, cfg))
  key = jax.random.key(7)
  first, again = draw(key), draw(key)
  assert all(int(a) == int(b) for a, b in zip(first, again))
  keys = jax.random.split(jax.random.key(0), 6000)
  t = jax.vmap(draw)(keys)
  mode, scale, rot = (np.asarray(v) for v in t)
  n = len(keys)
  # p(equivariant) = 0.5; p(low res) = 0.5 * 0.25; p(plain) = 0.5 * 0.75 (binomial sd <= 0.0065).
  np.testing.assert_allclose([np.mean(mode == m) for m in (eq.PLAIN, eq.EQUIVARIANT, eq.LOW_RES)],
                             [0.375, 0.5, 0.125], atol=0.03)
  counts = np.bincount(scale, minlength=len(cfg.scales))
  assert len(counts) == 24 and counts.min() > 0.7 * n / 24 and counts.max() < 1.3 * n / 24
  assert set(np.unique(rot)) == {1, 2, 3}
  np.testing.assert_allclose(np.bincount(rot)[1:] / n, [1 / 3] * 3, atol=0.03)
  # Different keys, different draws; and the probabilities' ends.
  assert len({tuple(int(v) for v in draw(k)) for k in keys[:50]}) > 20
  never = jax.vmap(lambda k: eq.sample_transform(k, eq.EquivarianceConfig(prob=0.0)))(keys[:500])
  always = jax.vmap(lambda k: eq.sample_transform(k, eq.EquivarianceConfig(prob=1.0)))(keys[:500])
  assert not np.any(np.asarray(never.mode) == eq.EQUIVARIANT)
  assert np.all(np.asarray(always.mode) == eq.EQUIVARIANT)


def _config_error(cfg, latent_size) -> str:
  with pytest.raises(ConfigError) as e:
    diffusability_rules.check_transforms(cfg, latent_size)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_bad_configs_are_one_line_config_errors():
  # EQ-VAE's k/32 on SD's 32 x 32 latent; the README's scales on f16 at 256 px.
  diffusability_rules.check_transforms(eq.EquivarianceConfig(), LATENT)
  diffusability_rules.check_transforms(eq.EquivarianceConfig(scales=eq.README_SCALES), 16)
  msg = _config_error(eq.EquivarianceConfig(scales=(0.5, 0.3)), LATENT)
  assert msg.startswith("config.loss.equivariance_scales: 0.3 does not map the 32x32 latent")
  assert "k/32" in msg and "0.25, 0.5, 0.75, 1" in msg
  # EQ-VAE's k/32 set on a 16 x 16 latent (VA-VAE's f16 at 256 px): 9/32 x 16 = 4.5.
  msg = _config_error(eq.EquivarianceConfig(), 16)
  assert "0.28125 does not map the 16x16 latent" in msg and "= 4.5" in msg
  for scales in ((1.5,), (0.0,), (-0.5,)):
    assert "does not map" in _config_error(eq.EquivarianceConfig(scales=scales), LATENT)
  assert "empty" in _config_error(eq.EquivarianceConfig(scales=()), LATENT)
  assert "equivariance_prob: 1.2" in _config_error(eq.EquivarianceConfig(prob=1.2), LATENT)
  msg = _config_error(eq.EquivarianceConfig(low_res_prob=-0.1), LATENT)
  assert "equivariance_low_res_prob" in msg
  msg = _config_error(eq.EquivarianceConfig(rotations=(1, 4)), LATENT)
  assert "equivariance_rotations" in msg and "(0, 1, 2, 3)" in msg
