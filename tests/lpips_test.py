"""LPIPS-VGG v0.1 against the `lpips` package (random VGG, the package's own lin weights)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import feature_nets
from vae_scale.errors import ConversionError
from vae_scale.interop import safetensors_io
from vae_scale.models import frozen_weights
from vae_scale.interop import torch_convert
from vae_scale.models import lpips

SIZE = 64
# Measured agreement is ~1e-7 relative (float32 on CPU); the bound leaves two orders of margin.
RTOL = 1e-5


@pytest.fixture(scope="module")
def pairs():
  """9 pairs (x, y): each photo vs its noisy copy, its blurred copy, and the next photo."""
  from skimage import filters  # pylint: disable=g-import-not-at-top
  photos = feature_nets.photos(SIZE)
  rng = np.random.default_rng(0)
  noisy = np.clip(photos + rng.normal(0, 0.1, photos.shape), -1, 1)
  blurred = np.stack([filters.gaussian(p, sigma=1.5, channel_axis=-1) for p in photos])
  x = np.concatenate([photos, photos, photos])
  y = np.concatenate([noisy, blurred, np.roll(photos, 1, axis=0)])
  return x.astype(np.float32), y.astype(np.float32)


@pytest.fixture(scope="module")
def torch_lpips():
  return feature_nets.torch_lpips()


@pytest.fixture(scope="module")
def files(torch_lpips, tmp_path_factory):
  """(converted .safetensors, torchvision-named VGG .pth)."""
  return feature_nets.lpips_files(torch_lpips, str(tmp_path_factory.mktemp("lpips")))


@pytest.fixture(scope="module")
def params(files):
  return frozen_weights.load_lpips_params(files[0])


@functools.partial(jax.jit, static_argnames="dtype")
def _distance(params, x, y, dtype=jnp.float32):
  return lpips.lpips_distance(params, x, y, dtype=dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _grad(params, x, y, dtype=jnp.float32):
  return jax.grad(lambda x: jnp.sum(lpips.lpips_distance(params, x, y, dtype=dtype)))(x)


def test_matches_lpips_package(params, torch_lpips, pairs):
  x, y = pairs
  with torch.no_grad():
    ref = torch_lpips(feature_nets.nchw(x), feature_nets.nchw(y)).numpy().reshape(-1)
  out = np.asarray(_distance(params, x, y))
  assert out.shape == (9,) and out.dtype == np.float32
  assert np.all(ref > 0)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=0)


def test_gradient_matches_lpips_package(params, torch_lpips, pairs):
  # Pairs whose x is chelsea or coffee. astronaut has pure black patches whose equal activations tie
  # in the 2x2 max pools, where torch and XLA send the gradient to different (equally valid)
  # elements (~1% apart there).
  keep = [1, 2, 4, 5, 7, 8]
  x, y = pairs[0][keep], pairs[1][keep]
  xt = feature_nets.nchw(x).requires_grad_(True)
  torch_lpips(xt, feature_nets.nchw(y)).sum().backward()
  ref = xt.grad.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(_grad(params, x, y))
  assert np.isfinite(out).all()
  # Per image, relative L2 error (measured <= 8e-6): single ReLU gates that sit at 0 within
  # rounding may open in one framework and not the other, so elementwise bounds would be flaky.
  err = np.linalg.norm((out - ref).reshape(6, -1), axis=1) / np.linalg.norm(ref.reshape(6, -1),
                                                                          axis=1)
  assert np.all(err < 1e-4), err


def test_identical_images_give_zero_and_finite_gradient(params, pairs):
  x, y = pairs
  # x and y run through separately compiled passes, so "zero" is up to float32 rounding.
  assert np.max(np.asarray(_distance(params, x, x))) < 1e-12
  g = np.asarray(_grad(params, x, x))
  assert np.isfinite(g).all()
  # d/dx sum((n(x) - n(y))^2) is 0 at x == y; compare with the gradient at x != y.
  assert np.max(np.abs(g)) < 1e-6 * np.max(np.abs(np.asarray(_grad(params, x, y))))


def test_unit_normalize_is_safe_at_zero():
  f = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0], [1e-30, 0.0, 0.0]], jnp.float32)
  w = jnp.array([0.3, -0.2, 0.5])
  np.testing.assert_allclose(np.asarray(lpips.unit_normalize(f)),
                             [[0, 0, 0], [0.6, 0, 0.8], [0, 0, 0]], atol=1e-6)
  g = jax.grad(lambda f: jnp.sum(lpips.unit_normalize(f) * w))(f)
  assert np.isfinite(np.asarray(g)).all()

  # The unguarded formula (lpips.normalize_tensor) is not finite there: NaN at the zero vector,
  # inf where 1e-30 squared underflows to 0 in float32. The guard matters.
  def naive(f):
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
  g_naive = np.asarray(jax.grad(lambda f: jnp.sum(naive(f) * w))(f))
  assert np.isnan(g_naive[0]).all() and not np.isfinite(g_naive[2]).all()


def test_gradient_finite_with_dead_features(params, pairs):
  """relu5_3 all zero (a very negative conv5_3 bias): the normalised tap is 0, gradients finite."""
  x, y = pairs
  dead = dict(params, **{"conv5_3.bias": np.full_like(params["conv5_3.bias"], -1e4)})
  taps = lpips.lpips_model(dead).features(jnp.asarray(x[:1]))
  assert float(jnp.max(taps[-1])) == 0.0
  assert np.isfinite(np.asarray(_distance(dead, x, y))).all()
  assert np.isfinite(np.asarray(_grad(dead, x, y))).all()


def test_bfloat16_compute_is_close_to_float32(params, pairs):
  x, y = pairs
  ref = np.asarray(_distance(params, x, y))
  out = np.asarray(_distance(params, x, y, dtype=jnp.bfloat16))
  assert out.dtype == np.float32
  # bfloat16 keeps 8 bits of mantissa through 13 convs; measured 0.13% here.
  np.testing.assert_allclose(out, ref, rtol=2e-2)
  assert np.isfinite(np.asarray(_grad(params, x, x, dtype=jnp.bfloat16))).all()


def test_params_layout(params):
  assert set(params) == set(lpips.lpips_shapes())
  assert params["conv1_1.kernel"].shape == (3, 3, 3, 64)
  assert params["conv5_3.kernel"].shape == (3, 3, 512, 512)
  assert params["lin4.kernel"].shape == (1, 1, 512, 1)
  lin = torch.load(torch_convert.default_lin_path(), map_location="cpu", weights_only=True)
  np.testing.assert_array_equal(params["lin2.kernel"][0, 0, :, 0],
                                lin["lin2.model.1.weight"].numpy().reshape(-1))
  # A jitted loss takes the params as an argument (frozen pytree), not as module state.
  model = lpips.lpips_model(params)
  assert isinstance(model, nnx.Module) and model.conv3_2.kernel.shape == (3, 3, 256, 256)
  with pytest.raises(ValueError, match="lin0.kernel"):
    lpips.lpips_model({k: v for k, v in params.items() if k != "lin0.kernel"})


def _one_line_error(fn, *args) -> str:
  with pytest.raises(ConversionError) as e:
    fn(*args)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_refuses_other_files(files, tmp_path):
  good, vgg_pth = files
  wrong = tmp_path / "inception.safetensors"
  safetensors_io.write_safetensors({"a": np.zeros(2, np.float32)}, str(wrong),
                                   metadata={"vae_scale_net": frozen_weights.INCEPTION_NET})
  untagged = tmp_path / "untagged.safetensors"
  safetensors_io.write_safetensors(frozen_weights.load_lpips_params(good), str(untagged))
  for path in (wrong, untagged):
    msg = _one_line_error(frozen_weights.load_lpips_params, str(path))
    assert str(path) in msg
    assert f"python -m vae_scale.convert lpips --out={path}" in msg
  assert "pytorch_fid_inception" in _one_line_error(frozen_weights.load_lpips_params, str(wrong))
  for path in (vgg_pth, str(tmp_path / "missing.safetensors")):
    msg = _one_line_error(frozen_weights.load_lpips_params, path)
    assert path in msg and "python -m vae_scale.convert lpips --out=" in msg
  assert "pickle" in _one_line_error(frozen_weights.load_lpips_params, vgg_pth)
  # The Inception loader refuses the LPIPS file the same way.
  msg = _one_line_error(frozen_weights.load_inception_params, good)
  assert good in msg and "python -m vae_scale.convert inception --src=" in msg


def test_convert_refuses_wrong_sources(files, tmp_path):
  _, vgg_pth = files
  lin = torch_convert.default_lin_path()
  out = str(tmp_path / "x.safetensors")
  msg = _one_line_error(torch_convert.convert_lpips, out, lin, lin)  # lin weights passed as VGG.
  assert lin in msg and "features.0.weight" in msg
  msg = _one_line_error(torch_convert.convert_lpips, out, vgg_pth, vgg_pth)  # VGG passed as lin.
  assert "lin0.model.1.weight" in msg
  msg = _one_line_error(torch_convert.convert_lpips, out, str(tmp_path / "nope.pth"), lin)
  assert "nope.pth does not exist" in msg and "IMAGENET1K_V1" in msg
  bad = tmp_path / "evil.pth"
  torch.save({"obj": _Unsafe()}, bad)  # Not loadable with weights_only=True.
  msg = _one_line_error(torch_convert.convert_lpips, out, str(bad), lin)
  assert "weights_only=True" in msg
  assert not (tmp_path / "x.safetensors").exists()


class _Unsafe:
  pass
