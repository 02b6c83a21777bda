"""models.resample: torch.nn.functional.interpolate's bilinear / bicubic (align_corners=False, with
and without antialias, by size or by scale factor), against torch itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vae_scale.models import resample

# (in, out): down and up, odd ratios, 1-pixel edges, same size; the references' own cases:
# DINOv2's 37 x 37 position grid to 16 / 8 / 5 patches, LightningDiT's 256 -> 224 px.
SIZES = [(37, 16), (37, 8), (37, 5), (16, 37), (5, 3), (3, 5), (256, 224), (32, 9), (7, 7), (1, 4),
         (4, 1), (24, 24)]
# EQ-VAE passes scale_factor = k / 32; 0.3 and 0.77 do not give integer sizes (positions move).
FACTORS = [(32, 9 / 32), (256, 9 / 32), (32, 31 / 32), (32, 0.3), (33, 0.5), (10, 0.77)]


@pytest.mark.parametrize("mode", resample.MODES)
@pytest.mark.parametrize("antialias", [False, True])
def test_matrix_matches_torch(mode, antialias):
  rng = np.random.default_rng(0)
  for n_in, n_out in SIZES:
    x = rng.normal(size=(2, 3, n_in, n_in + 1))
    ref = F.interpolate(torch.from_numpy(x), size=(n_out, n_out + 2), mode=mode,
                        align_corners=False, antialias=antialias).numpy()
    rows = resample.resize_matrix(n_in, n_out, mode, antialias)
    cols = resample.resize_matrix(n_in + 1, n_out + 2, mode, antialias)
    out = np.einsum("oh,bchw,pw->bcop", rows, x, cols, optimize=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12, err_msg=f"{n_in} -> {n_out}")
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("mode", resample.MODES)
@pytest.mark.parametrize("antialias", [False, True])
def test_scale_factor_matches_torch(mode, antialias):
  rng = np.random.default_rng(1)
  for n_in, factor in FACTORS:
    x = rng.normal(size=(1, 2, n_in, n_in))
    ref = F.interpolate(torch.from_numpy(x), scale_factor=factor, mode=mode, align_corners=False,
                        antialias=antialias).numpy()
    n_out = resample.scaled_size(n_in, factor)
    assert ref.shape[-1] == n_out
    m = resample.resize_matrix(n_in, n_out, mode, antialias, factor)
    out = np.einsum("oh,bchw,pw->bcop", m, x, m, optimize=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12, err_msg=f"{n_in} x {factor}")


def test_resize_is_jittable_and_differentiable_on_nhwc():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 37, 30, 5)).astype(np.float32)
  f = jax.jit(lambda x: resample.resize(x, (16, 11), "bicubic", antialias=True))
  out = np.asarray(f(x))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(16, 11), mode="bicubic",
                      align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
  assert out.shape == (2, 16, 11, 5) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
  # Linear in x: the gradient of sum(R x C) is R^T 1 C^T 1 for every channel.
  g = np.asarray(jax.grad(lambda x: jnp.sum(f(x)))(x))
  rows = resample.resize_matrix(37, 16, "bicubic", True).sum(0)
  cols = resample.resize_matrix(30, 11, "bicubic", True).sum(0)
  np.testing.assert_allclose(g[0, :, :, 0], np.outer(rows, cols), atol=1e-5)
  # bfloat16 in, bfloat16 out (computed in float32).
  assert resample.resize(jnp.asarray(x, jnp.bfloat16), (16, 11), "bilinear").dtype == jnp.bfloat16
  # Same size: untouched.
  np.testing.assert_array_equal(np.asarray(resample.resize(x, (37, 30), "bilinear")), x)


def test_bad_arguments():
  with pytest.raises(ValueError, match="nearest"):
    resample.resize_matrix(4, 2, "nearest")
  with pytest.raises(ValueError, match="positive"):
    resample.resize_matrix(4, 0, "bilinear")
