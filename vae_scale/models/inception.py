"""pytorch-fid's Inception-v3 "FID" network (pool3 features, 2048-d) in Flax NNX, NHWC.

This is `pytorch_fid.inception.InceptionV3([3])` with `resize_input=True, normalize_input=True`:
torchvision's Inception3 stem, Mixed_6a (InceptionB) and Mixed_7a (InceptionD), with the FID blocks
FIDInceptionA (Mixed_5b/c/d), FIDInceptionC (Mixed_6b..e), FIDInceptionE_1 (Mixed_7b) and
FIDInceptionE_2 (Mixed_7c): their branch average pools exclude the padding from the count
(count_include_pad=False, as TensorFlow's), and E_2's pool branch is a 3x3 max pool. Every conv is
BasicConv2d: conv without bias, batch norm in inference mode (eps 0.001), ReLU. The batch norm is
inference-only: it applies the stored running mean and variance and computes no statistics (so
none can lose digits to E[x²] − E[x]²); it is built with use_fast_variance=False all the same, as
every norm of the package is (tests/norms_test.py checks it).

Input convention: vae_scale images [B, H, W, 3] in [-1, 1] are mapped to pytorch-fid's [0, 1] by
(x + 1) / 2, then pytorch-fid's own path follows: bilinear resize to 299x299 (align_corners=False,
no antialiasing), 2x - 1, the network, global average pool. Images are not clipped: clip (or
quantize) reconstructions first to score them as saved images would be.

Parameter names mirror the torch state dict (`Mixed_5b.branch1x1.conv.kernel`, `.bn.scale`,
`.bn.bias`, `.bn.mean`, `.bn.var`); `vae_scale.models.frozen_weights.load_inception_params` returns
them.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vae_scale.models.lpips import merge_params
from vae_scale.models.lpips import param_shapes
from vae_scale.models.lpips import Params

Array = jax.Array
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001).


def resize_bilinear(images: Array, size: int = INPUT_SIZE) -> Array:
  """torch `F.interpolate(mode='bilinear', align_corners=False)` (no antialias) to size x size.

  Args:
    images: [B, H, W, C] float.
    size: output height and width.

  Returns:
    [B, size, size, C], same dtype.
  """
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, size, size, c), "bilinear", antialias=False)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (v[0], v[1])


class BasicConv2d(nnx.Module):
  """conv (no bias) -> batch norm (running statistics, eps 0.001, float32) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], *, stride: int = 1,
               padding: int | Sequence[int] = 0, dtype: Any, precision: Any, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                         use_bias=False, dtype=dtype, precision=precision, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, dtype=jnp.float32,
                            use_fast_variance=False, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return nnx.relu(self.bn(self.conv(x).astype(jnp.float32))).astype(self.dtype)


def _avg_pool_3x3(x: Array) -> Array:
  # TensorFlow's average pool (the FID patch): padded zeros are not counted.
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nnx.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nnx.Module):
  """FIDInceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""

  def __init__(self, cin: int, pool_features: int, **kw):
    self.branch1x1 = BasicConv2d(cin, 64, 1, **kw)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, **kw)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, **kw)

  def __call__(self, x: Array) -> Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """torchvision InceptionB (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

  def __init__(self, cin: int, **kw):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
  """FIDInceptionC: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool(no pad count)-1x1."""

  def __init__(self, cin: int, channels_7x7: int, **kw):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, 1, **kw)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

  def __call__(self, x: Array) -> Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = conv(bd)
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """torchvision InceptionD (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

  def __init__(self, cin: int, **kw):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, **kw)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                 self.branch7x7x3_4):
      b7 = conv(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
  """FIDInceptionE_1 (pool="avg", no pad count) / FIDInceptionE_2 (pool="max"):
  1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool 3x3/1-1x1."""

  def __init__(self, cin: int, pool: str, **kw):
    self.branch1x1 = BasicConv2d(cin, 320, 1, **kw)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, **kw)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(cin, 192, 1, **kw)
    self.pool = pool

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    if self.pool == "max":  # FIDInceptionE_2; torch pads a max pool with -inf, as flax does.
      pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3 up to pool3 (block index 3)."""

  def __init__(self, *, dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
    """Builds the network with random weights (use `inception_model` for real ones).

    Args:
      dtype: compute dtype of the convs; batch norm and the output are float32.
      precision: `jax.lax.Precision` of the convs; None follows `jax.default_matmul_precision`.
      rngs: initialisation keys.
    """
    kw = dict(dtype=dtype, precision=precision, rngs=rngs)
    self.dtype = dtype
    # Attribute names are the torch module names, so params convert by name.
    # pylint: disable=invalid-name
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, "avg", **kw)
    self.Mixed_7c = InceptionE(2048, "max", **kw)

  def __call__(self, images: Array) -> Array:
    """pool3 features.

    Args:
      images: [B, H, W, 3] in [-1, 1], any size (resized to 299x299).

    Returns:
      [B, 2048] float32.
    """
    x = (images.astype(jnp.float32) + 1.0) * 0.5  # Our [-1, 1] -> pytorch-fid's input [0, 1].
    x = resize_bilinear(x, INPUT_SIZE)  # InceptionV3.resize_input
    x = (2.0 * x - 1.0).astype(self.dtype)  # InceptionV3.normalize_input
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_3x3_s2(x)))
    x = _max_pool_3x3_s2(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def inception_shapes() -> dict[str, tuple[int, ...]]:
  """{name: shape} of the network's variables: conv kernels HWIO; bn scale, bias, mean, var [C]."""
  return param_shapes(lambda: InceptionV3(rngs=nnx.Rngs(0)))


def inception_model(params: Params, *, dtype: Any = jnp.float32,
                    precision: Any = None) -> InceptionV3:
  """An `InceptionV3` holding `params` (from `load_inception_params`); callable inside jit."""
  return merge_params(lambda: InceptionV3(dtype=dtype, precision=precision, rngs=nnx.Rngs(0)),
                      params)


def inception_features(params: Params, images: Array, *, dtype: Any = jnp.float32,
                       precision: Any = None) -> Array:
  """pool3 features of images, as a pure function of frozen params.

  Args:
    params: flat dict from `vae_scale.models.frozen_weights.load_inception_params`.
    images: [B, H, W, 3] in [-1, 1].
    dtype: compute dtype of the convs.
    precision: precision of the convs (None: the backend's default).

  Returns:
    [B, 2048] float32.
  """
  return inception_model(params, dtype=dtype, precision=precision)(images)
