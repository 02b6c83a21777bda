"""models/norms: the package's norms against float64 numpy where E[x²] − E[x]² breaks, the dtype
of statistics, and no fast-variance norm anywhere in the package (the models' graphs, and the
source of vae_scale/, so that later code is held to it too)."""

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from vae_scale.models import autoencoder
from vae_scale.models import discriminator
from vae_scale.models import inception
from vae_scale.models import norms


def _group_norm64(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
  """torch.nn.GroupNorm's mathematics in float64 numpy (channels last, no affine)."""
  x = np.asarray(x, np.float64)
  g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def _cases(rng):
  """(name, float32 activations [2, 16, 16, 8], bound): groups hard for one-pass variances, and
  the largest error the package's GroupNorm may make, in units of the output's own scale (1).

  Measured on this CPU: 5.5e-4 at offset 20 (the float32 sum of the mean carries 20 · 6e-8 · a
  few, against a spread of 0.01); 7.3e-7 on unit normals; 4.3e-6 with an outlier."""
  noise = rng.standard_normal((2, 16, 16, 8))
  outlier = 3.0 + 1e-3 * noise
  outlier[:, 0, 0, :] = 100.0  # One element 4e4 spreads away from the rest.
  return [("offset 20, spread 0.01", 20.0 + 0.01 * noise, 3e-3), ("unit normal", noise, 1e-5),
          ("outlier", outlier, 5e-5)]


@pytest.mark.parametrize("index", range(3))
def test_group_norm_matches_float64_where_the_fast_variance_breaks(index):
  name, x, bound = _cases(np.random.default_rng(0))[index]
  x = x.astype(np.float32)
  ref = _group_norm64(x, 2, 1e-6)
  norm = autoencoder.GroupNorm(8, 2, rngs=nnx.Rngs(0))
  y = jax.jit(lambda x: norm(x))(x)
  assert y.dtype == jnp.float32
  assert np.abs(np.asarray(y) - ref).max() < bound, name
  if index == 0:  # And flax's default E[x²] − E[x]² keeps no digit there (measured 28.5).
    fast = nnx.GroupNorm(8, num_groups=2, epsilon=1e-6, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(fast(jnp.asarray(x))) - ref).max() > 1.0


def test_group_norm_gradient_is_the_float64_gradient():
  x = (20.0 + 0.01 * np.random.default_rng(2).standard_normal((2, 8, 8, 4))).astype(np.float32)
  w = np.random.default_rng(3).standard_normal(x.shape)
  norm = autoencoder.GroupNorm(4, 2, rngs=nnx.Rngs(0))
  loss = lambda x: jnp.sum(jnp.sin(norm(x)) * w)
  grad = jax.jit(jax.grad(loss))(x)
  with jax.enable_x64(True):
    ref = np.asarray(jax.grad(loss)(jnp.asarray(x, jnp.float64)))
  assert grad.dtype == jnp.float32
  # The gradient is 1/σ = 100 times the output's scale: relative to its largest element.
  assert np.abs(np.asarray(grad) - ref).max() < 1e-2 * np.abs(ref).max()


def test_discriminator_batch_norm_matches_float64_at_a_large_mean():
  x = (20.0 + 0.01 * np.random.default_rng(4).standard_normal((8, 6, 6, 32))).astype(np.float32)
  norm = discriminator._Norm(32, "batch", rngs=nnx.Rngs(0))  # pylint: disable=protected-access
  y = np.asarray(norm(jnp.asarray(x), train=True), np.float64)
  x64 = x.astype(np.float64)
  mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  scale = np.asarray(norm.norm.scale[...])
  ref = (x64 - mean) / np.sqrt(var + 1e-5) * scale
  # Measured 3.5e-4 (the output's scale is about 0.95: eps 1e-5 against a variance of 1e-4).
  assert np.abs(y - ref).max() < 3e-3
  # The running statistics (momentum 0.9, from mean 0 and variance 1) take the batch's.
  np.testing.assert_allclose(np.asarray(norm.norm.mean[...]), 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(norm.norm.var[...]), 0.9 + 0.1 * var, rtol=1e-6)
  fast = nnx.BatchNorm(32, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
  fast.scale[...] = scale
  # E[x²] − E[x]² there: measured 7.1.
  assert np.abs(np.asarray(fast(jnp.asarray(x)), np.float64) - ref).max() > 1.0


def test_stat_dtype_is_float32_or_wider():
  assert norms.stat_dtype(jnp.bfloat16) == jnp.float32
  assert norms.stat_dtype(jnp.float32) == jnp.float32
  assert norms.stat_dtype(np.float64) == np.float64


def test_autoencoder_group_norm_keeps_its_parameters_and_dtype():
  module = autoencoder.GroupNorm(8, 2, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  assert {k: v.dtype for k, v in params["norm"].items()} == {"bias": jnp.float32,
                                                             "scale": jnp.float32}
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8), jnp.bfloat16) * 3 + 1
  y = module(x)
  assert y.dtype == jnp.bfloat16
  ref = _group_norm64(np.asarray(x, np.float32), 2, 1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=2e-2)  # bf16's rounding.


def _norm_modules(model: nnx.Module):
  """(path, module) for every module of `model` with a `use_fast_variance` attribute (flax's
  BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm)."""
  return [(path, m) for path, m in nnx.iter_graph(model) if hasattr(m, "use_fast_variance")]


@pytest.mark.parametrize("name", ["autoencoder", "discriminator_batch", "discriminator_group",
                                  "inception"])
def test_every_norm_of_the_models_is_two_pass(name):
  build = {
      "autoencoder": lambda: autoencoder.AutoencoderKL(autoencoder.AutoencoderConfig(
          ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32),
          rngs=nnx.Rngs(0)),
      "discriminator_batch": lambda: discriminator.NLayerDiscriminator(
          discriminator.DiscriminatorConfig(), rngs=nnx.Rngs(0)),
      "discriminator_group": lambda: discriminator.NLayerDiscriminator(
          discriminator.DiscriminatorConfig(norm="group"), rngs=nnx.Rngs(0)),
      "inception": lambda: inception.InceptionV3(rngs=nnx.Rngs(0)),
  }[name]
  found = _norm_modules(nnx.eval_shape(build))
  assert found, f"{name}: no norm found (the walk is broken)"
  fast = [path for path, m in found if m.use_fast_variance is not False]
  assert not fast, f"{name}: norms with use_fast_variance=True at {fast}"


# Constructors of flax norms whose variance defaults to E[x²] − E[x]² (use_fast_variance=True),
# and functions that always compute it that way.
_FLAX_NORMS = {"BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm"}
_ALWAYS_FAST = {"standardize"}  # jax.nn.standardize: mean(x²) − mean(x)².


def fast_variance_calls(source: str) -> list[tuple[int, str]]:
  """(line, call) for each flax norm built without `use_fast_variance=False`, and each call that
  always computes a fast variance, in Python `source`.

  Flax norms are recognised as attribute calls (`nnx.GroupNorm(...)`, `nn.LayerNorm(...)`,
  `flax.linen.BatchNorm(...)`) and as calls of names imported from a flax module; a class of the
  package with the same name (autoencoder.GroupNorm) is neither.
  """
  tree = ast.parse(source)
  from_flax = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flax")
               for alias in node.names}
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    if isinstance(func, ast.Attribute):
      name, is_flax = func.attr, True
    elif isinstance(func, ast.Name):
      name, is_flax = func.id, func.id in from_flax
    else:
      continue
    if name in _ALWAYS_FAST:
      found.append((node.lineno, name))
    elif name in _FLAX_NORMS and is_flax:
      flag = [k for k in node.keywords if k.arg == "use_fast_variance"]
      if not (flag and isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
        found.append((node.lineno, name))
  return found


def test_the_source_scan_catches_fast_variance_norms():
  bad = ("from flax import nnx\nfrom flax.linen import LayerNorm\nimport flax.linen as nn\n"
         "a = nnx.LayerNorm(8, rngs=r)\nb = nn.GroupNorm(num_groups=2)\nc = LayerNorm()\n"
         "d = nnx.BatchNorm(8, use_fast_variance=True, rngs=r)\ne = jax.nn.standardize(x)\n")
  assert [line for line, _ in fast_variance_calls(bad)] == [4, 5, 6, 7, 8]
  good = ("from flax import nnx\nclass GroupNorm: pass\nx = GroupNorm(8, 2)\n"
          "y = nnx.LayerNorm(8, use_fast_variance=False, rngs=r)\n")
  assert fast_variance_calls(good) == []


def test_no_norm_in_the_package_source_uses_the_fast_variance():
  files = sorted((REPO / "vae_scale").rglob("*.py"))
  assert len(files) > 20
  found = [f"{path.relative_to(REPO)}:{line} {call}" for path in files
           for line, call in fast_variance_calls(path.read_text())]
  assert not found, ("norms computing E[x²] − E[x]² (pass use_fast_variance=False, or use "
                     f"vae_scale.models.norms): {found}")
