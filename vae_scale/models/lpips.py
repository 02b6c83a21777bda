"""LPIPS (the `lpips` package v0.1, net='vgg', as taming-transformers / LDM use it) in Flax NNX.

distance(x, y) = sum over the VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of
spatial_mean(lin_k((n(f_k(x)) - n(f_k(y)))^2)), where f_k are torchvision's VGG16 `features` after
the package's ScalingLayer, n unit-normalises each pixel's feature vector,
x / (sqrt(sum x^2) + 1e-10), and lin_k is a learned 1x1 conv to one channel without bias (its
dropout acts in training only; LPIPS is never trained here, so there is none). Images are NHWC in
[-1, 1].

The convs compute in `dtype` (bfloat16 is fine); the normalisation, squared differences, lin heads
and sums are float32. Weights come from `vae_scale.models.frozen_weights.load_lpips_params` as a flat
dict (`conv1_1.kernel`, ..., `lin4.kernel`); `lpips_distance(params, x, y)` is the pure form a
jitted loss calls with those params as a frozen pytree argument.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Params = Mapping[str, Any]  # Flat {"conv1_1.kernel": [3, 3, 3, 64], ...}: names joined by ".".

# ScalingLayer of lpips v0.1 (torch float32 buffers): images in [-1, 1] -> ImageNet-normalised.
SHIFT = (-.030, -.088, -.188)
SCALE = (.458, .448, .450)
# VGG16 conv widths per block (torchvision `features` 0..29); each block ends at a tapped ReLU.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CHANNELS = tuple(block[-1] for block in VGG_BLOCKS)  # Widths of the 5 taps: 64, 128, 256, 512, 512.
NORM_EPS = 1e-10  # lpips.normalize_tensor's epsilon (added to the norm, not under the sqrt).


def conv_names() -> list[str]:
  """The 13 VGG conv names `conv{block}_{i}`, in torchvision `features` order."""
  return [f"conv{b}_{i}" for b, widths in enumerate(VGG_BLOCKS, 1)
          for i in range(1, len(widths) + 1)]


def unit_normalize(features: Array) -> Array:
  """Each pixel's feature vector divided by (its L2 norm + 1e-10), in float32.

  sqrt(sum x^2) has an infinite derivative where the sum is 0: at an all-zero pixel (a ReLU map can
  have them; there the ReLU's own gradient happens to mask the resulting NaN) and at tiny nonzero
  features whose squares underflow (bfloat16 activations), where inf reaches the input gradient. A
  sqrt guarded by `where` gives the same values and a zero derivative there.

  Args:
    features: [..., C] any float dtype.

  Returns:
    [..., C] float32 with norm 1 (or 0 for an all-zero vector).
  """
  f = features.astype(jnp.float32)
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + NORM_EPS)


class LPIPS(nnx.Module):
  """LPIPS-VGG v0.1: per-image perceptual distance between two image batches.

  Attributes are named `conv1_1` ... `conv5_3` (torchvision `features.0` ... `features.28`) and
  `lin0` ... `lin4` (the package's `lin{k}.model.1`).
  """

  def __init__(self, *, dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
    """Builds the network with random weights (use `lpips_model` for real ones).

    Args:
      dtype: compute dtype of the VGG convs (parameters stay float32).
      precision: `jax.lax.Precision` of the VGG convs; None follows `jax.default_matmul_precision`.
      rngs: initialisation keys.
    """
    self.dtype = dtype
    cin = 3
    for name, cout in zip(conv_names(), [w for block in VGG_BLOCKS for w in block]):
      setattr(self, name, nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                                   precision=precision, rngs=rngs))
      cin = cout
    for k, c in enumerate(CHANNELS):
      # Cheap (one output channel), so always full float32 precision.
      setattr(self, f"lin{k}", nnx.Conv(c, 1, (1, 1), use_bias=False, dtype=jnp.float32,
                                        precision=jax.lax.Precision.HIGHEST, rngs=rngs))

  def features(self, images: Array) -> list[Array]:
    """The five VGG16 taps of the scaled images.

    Args:
      images: [B, H, W, 3] in [-1, 1].

    Returns:
      relu1_2 [B, H, W, 64], relu2_2 [B, H/2, W/2, 128], relu3_3 [.., 256], relu4_3 [.., 512],
      relu5_3 [B, H/16, W/16, 512] (floor division), in `dtype`.
    """
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    h = ((images.astype(jnp.float32) - shift) / scale).astype(self.dtype)
    taps, names = [], iter(conv_names())
    for b, widths in enumerate(VGG_BLOCKS):
      if b:
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
      for _ in widths:
        h = nnx.relu(getattr(self, next(names))(h))
      taps.append(h)
    return taps

  def __call__(self, x: Array, y: Array) -> Array:
    """Per-image LPIPS distance.

    Args:
      x: [B, H, W, 3] in [-1, 1] (e.g. reconstructions; gradients flow through both inputs).
      y: [B, H, W, 3] in [-1, 1].

    Returns:
      [B] float32, >= 0 for the package's (non-negative) lin weights; 0 where x == y.
    """
    # Two passes rather than one over concatenate([x, y]): a concatenated batch would have to be
    # re-sharded across devices when the batch axis is sharded.
    fx, fy = self.features(x), self.features(y)
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for k, (a, b) in enumerate(zip(fx, fy)):
      diff = jnp.square(unit_normalize(a) - unit_normalize(b))
      total = total + jnp.mean(getattr(self, f"lin{k}")(diff), axis=(1, 2, 3))
    return total


# ------------------------------------------------------------------ flat params <-> modules


def flat_state(tree: nnx.Module | nnx.State) -> dict[str, Any]:
  """All variables of a module (or split state) as a flat {"a.b.kernel": leaf} dict."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(nnx.to_pure_dict(state), "")
  return out


def param_shapes(factory: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
  """{name: shape} of every variable the module `factory()` builds (nothing is allocated)."""
  return {k: tuple(v.shape) for k, v in flat_state(nnx.eval_shape(factory)).items()}


def merge_params(factory: Callable[[], nnx.Module], params: Params) -> nnx.Module:
  """The module `factory()` builds, holding `params` instead of random weights.

  Works under `jax.jit` with traced params: the module is built abstractly (`nnx.eval_shape`) and
  the arrays are merged in, so no random weights are ever allocated.

  Args:
    factory: builds the module, e.g. `lambda: LPIPS(rngs=nnx.Rngs(0))`.
    params: flat {name: array} with exactly the module's names and shapes.

  Raises:
    ValueError: a name is missing or unknown, or a shape differs.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, state = nnx.split(abstract)
  return merge_split(graphdef, state, params, type(abstract).__name__)


def merge_split(graphdef: Any, state: nnx.State, params: Params, name: str = "the module"
                ) -> nnx.Module:
  """`merge_params` from an already split abstract module (`state` itself is left unchanged), for
  callers that cache the split: building a deep network abstractly can take seconds."""
  expected = {k: tuple(v.shape) for k, v in flat_state(state).items()}
  problems = sorted(set(expected) ^ set(params))
  problems += [f"{k}: {tuple(np.shape(params[k]))} != {s}" for k, s in expected.items()
               if k in params and tuple(np.shape(params[k])) != s]
  if problems:
    raise ValueError(f"params do not fit {name}: {problems[:5]}")
  nested: dict[str, Any] = {}
  for key, value in params.items():
    *parents, leaf = key.split(".")
    node = nested
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = value
  state = jax.tree.map(lambda leaf: leaf, state)  # A copy: replace_by_pure_dict fills it in place.
  nnx.replace_by_pure_dict(state, nested)
  return nnx.merge(graphdef, state)


def lpips_shapes() -> dict[str, tuple[int, ...]]:
  """{name: shape} of LPIPS's params: conv kernels HWIO [3, 3, in, out], biases [out], lins
  [1, 1, C, 1]."""
  return param_shapes(lambda: LPIPS(rngs=nnx.Rngs(0)))


def lpips_model(params: Params, *, dtype: Any = jnp.float32, precision: Any = None) -> LPIPS:
  """An `LPIPS` holding `params` (from `load_lpips_params`); callable inside jit."""
  return merge_params(lambda: LPIPS(dtype=dtype, precision=precision, rngs=nnx.Rngs(0)), params)


def lpips_distance(params: Params, x: Array, y: Array, *, dtype: Any = jnp.float32,
                   precision: Any = None) -> Array:
  """Per-image LPIPS-VGG v0.1 distance, as a pure function of frozen params.

  Args:
    params: flat dict from `vae_scale.models.frozen_weights.load_lpips_params` (numpy or jax arrays).
    x: [B, H, W, 3] in [-1, 1].
    y: [B, H, W, 3] in [-1, 1].
    dtype: compute dtype of the VGG convs; everything after them is float32.
    precision: precision of the VGG convs (None: the backend's default).

  Returns:
    [B] float32 distances.
  """
  return lpips_model(params, dtype=dtype, precision=precision)(x, y)
