"""`torch.nn.functional.interpolate`'s bilinear and bicubic resampling, exactly, as matrices.

The reference code this project follows resamples with PyTorch: DINOv2's position embeddings
(transformers: bicubic, with antialias for the registers model; timm: bicubic with antialias),
LightningDiT's image resize before DINOv2 (bilinear) and EQ-VAE's down-scaling of images and
latents (bilinear). `jax.image.resize` uses other kernels (Keys a = -0.5 for cubic, antialias always
on when down-scaling) and edge rules, so its numbers differ. Every one of these resamplings is
separable, with sizes known when a program is traced: each axis becomes a constant
[out, in] matrix, built here in float64 numpy from PyTorch's formulas (align_corners=False, the
only setting the references use), and applied with one einsum per axis.

PyTorch's rules (aten/src/ATen/native/UpSample.h and cpu/UpSampleKernel.cpp):
  scale = 1 / scale_factor when a scale factor is passed (and not recomputed), else in / out.
  bilinear: src = max(scale * (i + 0.5) - 0.5, 0); neighbours floor(src) and the next one, the
    last index clamped.
  bicubic: src = scale * (i + 0.5) - 0.5 (not clamped); Keys' cubic with A = -0.75 on the four
    neighbours floor(src) - 1 ... floor(src) + 2, indices clamped to the edge.
  antialias (both modes): PIL's filter: support = (2 or 1) * max(scale, 1) around
    center = scale * (i + 0.5), taps within [0, in), weights filter((j - center + 0.5) /
    max(scale, 1)) normalised to sum 1; the cubic filter uses A = -0.5 there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MODES = ("bilinear", "bicubic")
_CUBIC_A = -0.75  # torch's bicubic without antialias.
_CUBIC_A_AA = -0.5  # torch's (and PIL's) bicubic filter with antialias.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, at distances x."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  return np.maximum(1.0 - np.abs(x), 0.0)


def _coordinate_scale(in_size: int, out_size: int, scale_factor: float | None) -> float:
  if scale_factor is not None and scale_factor > 0:
    return 1.0 / scale_factor
  return in_size / out_size


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, mode: str, antialias: bool = False,
                  scale_factor: float | None = None) -> np.ndarray:
  """The [out_size, in_size] float64 matrix of torch's 1-D resampling (align_corners=False).

  Args:
    in_size: input length along the axis (>= 1).
    out_size: output length (>= 1).
    mode: 'bilinear' or 'bicubic'.
    antialias: torch's `antialias=True` (PIL's filters; matters when down-scaling).
    scale_factor: the `scale_factor` torch was given for this axis (it sets the sampling
      positions, not only the size), or None when it was given `size`.

  Returns:
    R with out[i] = sum_j R[i, j] * in[j]; each row sums to 1.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive: {in_size} -> {out_size}")
  scale = _coordinate_scale(in_size, out_size, scale_factor)
  out = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if antialias:
    interp = 4 if mode == "bicubic" else 2
    support = interp * 0.5 * scale if scale >= 1.0 else interp * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    kernel = (lambda x: _cubic(x, _CUBIC_A_AA)) if mode == "bicubic" else _triangle
    for i in rows:
      center = scale * (i + 0.5)
      # int() truncates towards zero, as the C++ static_cast does.
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.arange(lo, hi)
      w = kernel((taps - center + 0.5) * invscale)
      total = w.sum()
      out[i, taps] = w / total if total != 0 else w
    return _frozen(out)
  if mode == "bilinear":
    src = np.maximum(scale * (rows + 0.5) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    np.add.at(out, (rows, i0), 1.0 - lam)
    np.add.at(out, (rows, i1), lam)
    return _frozen(out)
  src = scale * (rows + 0.5) - 0.5
  base = np.floor(src).astype(np.int64)
  t = src - base
  for offset in (-1, 0, 1, 2):
    idx = np.clip(base + offset, 0, in_size - 1)
    np.add.at(out, (rows, idx), _cubic(t - offset, _CUBIC_A))
  return _frozen(out)


def _frozen(matrix: np.ndarray) -> np.ndarray:
  matrix.flags.writeable = False  # Cached and shared: nobody may change it.
  return matrix


def resize(x: Array, size: tuple[int, int], mode: str, *, antialias: bool = False,
           scale_factor: tuple[float, float] | None = None, axes: tuple[int, int] = (1, 2),
           precision=jax.lax.Precision.HIGHEST) -> Array:
  """Resamples two axes of `x` as `F.interpolate(..., mode, align_corners=False)` does.

  Args:
    x: any float array; `axes` are its (height, width) axes, e.g. [B, H, W, C] with (1, 2).
    size: (out_height, out_width).
    mode: 'bilinear' or 'bicubic'.
    antialias: torch's antialias flag.
    scale_factor: torch's `scale_factor` per axis when the reference passed one (it moves the
      sampling positions when in * factor is not an integer), else None.
    axes: the two axes to resample.
    precision: of the einsums (HIGHEST: exact float32 sums on every backend).

  Returns:
    `x` with those axes resized, in x's dtype (computed in float32 at least).
  """
  out = x
  compute = jnp.promote_types(x.dtype, jnp.float32)
  for k, (axis, n_out) in enumerate(zip(axes, size)):
    n_in = x.shape[axis]
    factor = None if scale_factor is None else scale_factor[k]
    if n_in == n_out and (factor is None or factor == 1.0):
      continue
    matrix = jnp.asarray(resize_matrix(n_in, n_out, mode, antialias, factor), compute)
    out = jnp.moveaxis(
        jnp.tensordot(matrix, jnp.moveaxis(out.astype(compute), axis, 0), axes=1,
                      precision=precision), 0, axis)
  return out.astype(x.dtype)


def scaled_size(size: int, scale_factor: float) -> int:
  """torch's output length for `scale_factor`: floor(size * scale_factor) (in double)."""
  return int(math.floor(size * scale_factor))
