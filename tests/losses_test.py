"""Losses and metrics against independent references (numpy, scikit-image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.filters
import skimage.metrics
import skimage.transform

from vae_scale.training import losses
from vae_scale.models import DiagonalGaussian


def _photo(name: str, size: int = 96) -> np.ndarray:
  img = getattr(skimage.data, name)()[..., :3].astype(np.float64) / 255.0
  return skimage.transform.resize(img, (size, size), anti_aliasing=True)


@pytest.mark.parametrize("name,distortion", [("astronaut", "noise"), ("coffee", "blur"),
                                             ("chelsea", "noise+blur"), ("rocket", "noise")])
def test_ssim_matches_scikit_image(name, distortion):
  x = _photo(name)
  y = x.copy()
  rng = np.random.default_rng(0)
  if "blur" in distortion:
    y = skimage.filters.gaussian(y, sigma=1.2, channel_axis=-1)
  if "noise" in distortion:
    y = np.clip(y + rng.normal(0, 0.08, y.shape), 0, 1)
  want = skimage.metrics.structural_similarity(
      x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
      channel_axis=-1)
  # vae_scale takes images in [-1, 1].
  got = jax.jit(losses.ssim)(jnp.asarray(x[None] * 2 - 1, jnp.float32),
                             jnp.asarray(y[None] * 2 - 1, jnp.float32))
  assert abs(float(got[0]) - want) < 1e-4, (float(got[0]), want)
  assert float(losses.ssim_loss(jnp.asarray(x[None] * 2 - 1), jnp.asarray(x[None] * 2 - 1))) < 1e-5


def test_psnr_matches_scikit_image():
  x = _photo("astronaut")
  y = np.clip(x + np.random.default_rng(1).normal(0, 0.05, x.shape), 0, 1)
  want = skimage.metrics.peak_signal_noise_ratio(x, y, data_range=1)
  got = losses.psnr(jnp.asarray(x[None] * 2 - 1, jnp.float32), jnp.asarray(y[None] * 2 - 1, jnp.float32))
  assert abs(float(got[0]) - want) < 1e-3


def test_kl_matches_numpy_formula():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 4, 4, 4))
  logvar = rng.uniform(-3, 2, size=(3, 4, 4, 4))
  post = DiagonalGaussian(jnp.asarray(np.concatenate([mean, logvar], -1), jnp.float32))
  per_elem = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar)
  np.testing.assert_allclose(np.asarray(post.kl()), per_elem.sum((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(float(losses.kl_loss(post)), per_elem.sum((1, 2, 3)).mean(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(losses.kl_per_channel(post)),
                             per_elem.sum((1, 2)).mean(0), rtol=1e-5)
  # Standard normal posterior has zero KL.
  zero = DiagonalGaussian(jnp.zeros((2, 4, 4, 8)))
  assert float(losses.kl_loss(zero)) == 0.0


def test_l1_matches_numpy():
  rng = np.random.default_rng(0)
  x, y = rng.uniform(-1, 1, (2, 2, 8, 8, 3))
  np.testing.assert_allclose(float(losses.l1_loss(jnp.asarray(x), jnp.asarray(y))),
                             np.abs(x - y).mean(), rtol=1e-6)


def test_kl_warmup_schedule():
  assert float(losses.kl_weight_at(0, 1e-6, 0)) == pytest.approx(1e-6)
  assert float(losses.kl_weight_at(0, 1e-6, 100)) == 0.0
  assert float(losses.kl_weight_at(50, 1e-6, 100)) == pytest.approx(5e-7)
  assert float(losses.kl_weight_at(1000, 1e-6, 100)) == pytest.approx(1e-6)


def test_total_loss_terms_and_finite_gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  x_hat = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  moments = jnp.asarray(rng.normal(size=(2, 2, 2, 8)), jnp.float32)

  def total(x_hat, moments):
    loss, terms = losses.autoencoder_loss(x, x_hat, DiagonalGaussian(moments), l1_weight=1.0,
                                          ssim_weight=0.5, kl_weight=1e-3)
    return loss, terms

  (loss, terms), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x_hat, moments)
  want = terms["l1"] + 0.5 * terms["ssim_loss"] + 1e-3 * terms["kl_per_element"]
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
  # Each term alone has a finite, non-zero gradient too.
  for fn in (lambda a: losses.l1_loss(x, a), lambda a: losses.ssim_loss(x, a)):
    g = np.asarray(jax.grad(fn)(x_hat))
    assert np.isfinite(g).all() and np.abs(g).sum() > 0
  g = jax.grad(lambda m: losses.kl_loss(DiagonalGaussian(m)))(moments)
  assert np.isfinite(np.asarray(g)).all()


def test_l2_matches_numpy():
  rng = np.random.default_rng(1)
  x, y = rng.uniform(-1, 1, (2, 2, 8, 8, 3))
  np.testing.assert_allclose(float(losses.l2_loss(jnp.asarray(x), jnp.asarray(y))),
                             np.square(x - y).mean(), rtol=1e-6)
  rec, terms = losses.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), l1_weight=0.0,
                                          ssim_weight=0.0, l2_weight=2.0)
  np.testing.assert_allclose(float(rec), 2 * np.square(x - y).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(terms["l1"]), np.abs(x - y).mean(), rtol=1e-6)


# --------------------------------------------------------------------------- LPIPS and LDM's units
# The `lpips` package with a seeded random VGG (tests/feature_nets.py) is the reference.


@pytest.fixture(scope="module")
def lpips_reference(tmp_path_factory):
  """(JAX LPIPS params, the lpips package's torch module holding the same weights)."""
  import feature_nets  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  net = feature_nets.torch_lpips()
  path, _ = feature_nets.lpips_files(net, str(tmp_path_factory.mktemp("lpips")))
  return frozen_weights.load_lpips_params(path), net


@pytest.fixture(scope="module")
def pair():
  """Three 32 px photos and noisy, slightly out-of-range "reconstructions" of them."""
  import feature_nets  # pylint: disable=g-import-not-at-top
  x = feature_nets.photos(32)
  x_hat = x + np.random.default_rng(2).normal(0, 0.15, x.shape).astype(np.float32)
  return x, x_hat


def _torch_lpips(net, x_hat, x) -> np.ndarray:
  import feature_nets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return net(feature_nets.nchw(x_hat), feature_nets.nchw(x)).numpy().reshape(-1).astype(np.float64)


def _perceptual(params):
  from vae_scale.models import lpips  # pylint: disable=g-import-not-at-top
  return lambda a, b: lpips.lpips_distance(params, a, b)


def test_lpips_term_matches_the_lpips_package(lpips_reference, pair):
  params, net = lpips_reference
  x, x_hat = pair
  ref = _torch_lpips(net, x_hat, x)
  assert np.all(ref > 0)
  rec_fn = jax.jit(lambda a, b: losses.reconstruction_loss(
      a, b, l1_weight=0.0, ssim_weight=0.0, perceptual_weight=0.7,
      perceptual_fn=_perceptual(params)))
  rec, terms = rec_fn(x, x_hat)
  np.testing.assert_allclose(float(terms["lpips"]), ref.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(rec), 0.7 * ref.mean(), rtol=1e-5)
  g = np.asarray(jax.grad(lambda b: rec_fn(x, b)[0])(x_hat))
  assert np.isfinite(g).all() and np.abs(g).sum() > 0
  with pytest.raises(ValueError, match="perceptual_fn"):
    losses.reconstruction_loss(x, x_hat, l1_weight=1.0, ssim_weight=0.0, perceptual_weight=1.0)


def _ldm_loss(x, x_hat, mean, logvar, lpips_b, *, p_weight, kl_weight):
  """LDM's LPIPSWithDiscriminator (logvar 0, before disc_start) in numpy, NHWC."""
  rec = np.abs(x - x_hat) + p_weight * lpips_b[:, None, None, None]
  nll = np.sum(rec) / rec.shape[0]
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  return nll + kl_weight * np.sum(kl) / kl.shape[0], nll


def test_ldm_sum_reduction_is_ldms_loss(lpips_reference, pair):
  params, net = lpips_reference
  x, x_hat = (a.astype(np.float64) for a in pair)
  rng = np.random.default_rng(3)
  mean, logvar = rng.normal(size=(3, 4, 4, 4)), rng.uniform(-3, 1, size=(3, 4, 4, 4))
  post = DiagonalGaussian(jnp.asarray(np.concatenate([mean, logvar], -1), jnp.float32))
  want, want_nll = _ldm_loss(x, x_hat, mean, logvar, _torch_lpips(net, pair[1], pair[0]),
                             p_weight=1.0, kl_weight=1e-6)
  kw = dict(l1_weight=1.0, ssim_weight=0.0, perceptual_weight=1.0,
            perceptual_fn=_perceptual(params))
  loss, terms = losses.autoencoder_loss(pair[0], pair[1], post, kl_weight=1e-6,
                                        reduction="ldm_sum", **kw)
  np.testing.assert_allclose(float(terms["rec_loss"]), want_nll, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # 'mean' is the same loss per element: the reconstruction / (H W C), the KL / (h w c).
  loss_mean, terms_mean = losses.autoencoder_loss(pair[0], pair[1], post, kl_weight=1e-6,
                                                  reduction="mean", **kw)
  np.testing.assert_allclose(float(terms_mean["rec_loss"]), want_nll / (32 * 32 * 3), rtol=1e-5)
  kl_elem = float(terms["kl"]) / (4 * 4 * 4)
  np.testing.assert_allclose(float(loss_mean), want_nll / 3072 + 1e-6 * kl_elem, rtol=1e-5)
  # Squared error sums the same way.
  rec_l2, _ = losses.reconstruction_loss(pair[0], pair[1], l1_weight=0.0, ssim_weight=0.0,
                                         l2_weight=1.0, reduction="ldm_sum")
  np.testing.assert_allclose(float(rec_l2), np.sum((x - x_hat) ** 2) / 3, rtol=1e-5)
