"""The NLayer PatchGAN discriminator of taming-transformers / LDM, in Flax NNX.

At the defaults (3 layers, 64 filters, 3 input channels, batch norm) it has 2,765,633 parameters and
maps a 256x256 image to 30x30 logits. Under jit with a batch sharded over devices, batch norm
statistics are taken over the global batch, so results do not depend on the device count: they are
means over the batch axis of a sharded array, which XLA's SPMD partitioner turns into all-reduces.
The variance is two-pass (flax's use_fast_variance=False: the global mean, then the global mean of
squared deviations, one more all-reduce), never E[x²] − E[x]², which cancels when a channel's mean
dwarfs its spread (tests/norms_test.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

_PAD = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  in_channels: int = 3
  filters: int = 64
  n_layers: int = 3
  norm: str = "batch"  # batch | group
  dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DiscriminatorConfig":
    return cls(in_channels=config.model.out_channels, filters=config.disc.filters,
               n_layers=config.disc.n_layers, norm=config.disc.norm,
               dtype=jnp.dtype(config.model.dtype))


def _normal_init(std: float, mean: float = 0.0):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


class _Norm(nnx.Module):
  """Batch norm (momentum 0.9 = torch's 0.1, eps 1e-5) or GroupNorm(32); float32 two-pass
  statistics."""

  def __init__(self, channels: int, kind: str, *, rngs: nnx.Rngs):
    if kind == "batch":
      self.norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                                scale_init=_normal_init(0.02, 1.0), use_fast_variance=False,
                                rngs=rngs)
    else:
      self.norm = nnx.GroupNorm(channels, num_groups=32, epsilon=1e-5, dtype=jnp.float32,
                                scale_init=_normal_init(0.02, 1.0), use_fast_variance=False,
                                rngs=rngs)
    self.kind = kind

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = x.astype(jnp.float32)
    y = self.norm(y, use_running_average=not train) if self.kind == "batch" else self.norm(y)
    return y.astype(x.dtype)


class NLayerDiscriminator(nnx.Module):
  """conv4x4/2 + LeakyReLU(0.2); n_layers-1 x [conv4x4/2, norm, LeakyReLU]; conv4x4/1, norm,
  LeakyReLU; conv4x4/1 -> 1 channel. Weights N(0, 0.02), norm scales N(1, 0.02)."""

  def __init__(self, cfg: DiscriminatorConfig, *, rngs: nnx.Rngs):
    conv = lambda cin, cout, stride, bias: nnx.Conv(
        cin, cout, (4, 4), strides=stride, padding=_PAD, use_bias=bias, dtype=cfg.dtype,
        kernel_init=_normal_init(0.02), rngs=rngs)
    nf = cfg.filters
    self.conv_in = conv(cfg.in_channels, nf, 2, True)
    convs, norms, mult = [], [], 1
    for n in range(1, cfg.n_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      convs.append(conv(nf * prev, nf * mult, 2 if n < cfg.n_layers else 1, False))
      norms.append(_Norm(nf * mult, cfg.norm, rngs=rngs))
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.conv_out = conv(nf * mult, 1, 1, True)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] -> patch logits [B, H', W', 1] (float32)."""
    h = nnx.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      h = nnx.leaky_relu(norm(conv(h), train), 0.2)
    return self.conv_out(h).astype(jnp.float32)
