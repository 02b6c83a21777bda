"""The LDM / Stable Diffusion KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX.

Module and parameter names follow diffusers (`encoder.down_blocks[i].resnets[j].conv1`, ...) so that
checkpoints convert by renaming and transposing alone. Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vae_scale.models import norms

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of an `AutoencoderKL`; the defaults are the SD KL-f8 model."""

  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  mid_attention: bool = True
  z_channels: int = 4
  double_z: bool = True
  resolution: int = 256
  norm_groups: int = 32
  dropout: float = 0.0
  dtype: Any = jnp.float32
  # Rematerialization (jax.checkpoint with REMAT_POLICY): none | block (each ResNet, attention,
  # down- and upsampling block) | level (each encoder/decoder level and mid block as a whole).
  remat: str = "none"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "AutoencoderConfig":
    """Builds it from a run config (`config.model` and `config.image_size`)."""
    m = config.model
    return cls(
        in_channels=m.in_channels, out_channels=m.out_channels, ch=m.ch,
        ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), mid_attention=m.mid_attention,
        z_channels=m.z_channels, double_z=m.double_z, resolution=config.image_size,
        norm_groups=m.norm_groups, dropout=m.dropout, dtype=jnp.dtype(m.dtype), remat=m.remat)


class GroupNorm(nnx.Module):
  """GroupNorm(eps 1e-6) with two-pass statistics and the affine in float32 (float64 in a float64
  run), whatever the input's dtype (see `norms`)."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    # dtype None: the norm computes in its input's dtype, which __call__ sets.
    self.norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=None,
                              use_fast_variance=False, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.norm(x.astype(norms.stat_dtype(x.dtype))).astype(x.dtype)


def _conv(cin: int, cout: int, k: int, dtype, rngs: nnx.Rngs, stride: int = 1,
          padding: Any = "SAME") -> nnx.Conv:
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus a 1x1 shortcut on width change."""

  def __init__(self, cin: int, cout: int, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(cin, cfg.norm_groups, rngs=rngs)
    self.conv1 = _conv(cin, cout, 3, cfg.dtype, rngs)
    self.norm2 = GroupNorm(cout, cfg.norm_groups, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.conv2 = _conv(cout, cout, 3, cfg.dtype, rngs)
    self.conv_shortcut = _conv(cin, cout, 1, cfg.dtype, rngs) if cin != cout else None

  def __call__(self, x: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = nnx.silu(self.norm2(h))
    h = self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.conv2(h)
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions, scale C^-1/2, residual; softmax in float32
  (float64 in a float64 run)."""

  def __init__(self, channels: int, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(channels, cfg.norm_groups, rngs=rngs)
    lin = lambda: nnx.Linear(channels, channels, dtype=cfg.dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = lin(), lin(), lin(), lin()

  def __call__(self, x: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    del deterministic, rngs
    b, hh, ww, c = x.shape
    h = self.group_norm(x).reshape(b, hh * ww, c)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    scores = jnp.einsum("bqc,bkc->bqk", q, k,
                        preferred_element_type=norms.stat_dtype(q.dtype)) * (c ** -0.5)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v)
    return x + self.to_out(out).reshape(b, hh, ww, c)


class Downsample(nnx.Module):
  """Pad right and bottom by one, then a 3x3 stride-2 VALID conv (LDM's asymmetric padding)."""

  def __init__(self, channels: int, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg.dtype, rngs, stride=2, padding="VALID")

  def __call__(self, x: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    del deterministic, rngs  # The (h, deterministic, rngs) call of every block, for `_run`.
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg.dtype, rngs)

  def __call__(self, x: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    del deterministic, rngs
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


# What a rematerialized block keeps for the backward pass: nothing but its inputs. The model is
# convolutional, and JAX's `dots_*` policies match only dot_general (not convolutions), so they would
# save the attention projections and little else; `nothing_saveable` states the real behaviour.
# JAX drops recomputation that no gradient needs: a conv's residual is its input, so a ResNet block
# recomputes GN -> SiLU -> conv1 -> GN -> SiLU (not conv2), and Down/Upsample only the pad / repeat.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def _run(block: nnx.Module, h: Array, remat: bool, deterministic: bool, rngs) -> Array:
  """block(h, deterministic, rngs), rematerialized in the backward pass when `remat`."""
  if remat:
    # rngs is an argument (not a closure) so that dropout draws the same mask when recomputed.
    fn = nnx.remat(lambda blk, y, r: blk(y, deterministic, r), policy=REMAT_POLICY)
    return fn(block, h, rngs)
  return block(h, deterministic, rngs)


def _level(cin: int, cout: int, num: int, res: int, cfg: AutoencoderConfig, rngs: nnx.Rngs):
  """The ResNet blocks of one level and, at listed resolutions, an attention block after each."""
  resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                      for i in range(num)])
  attentions = nnx.List([AttnBlock(cout, cfg, rngs=rngs) for _ in range(num)]
                        if res in cfg.attn_resolutions else [])
  return resnets, attentions


def _run_level(level: nnx.Module, resamplers: nnx.List, h: Array, deterministic: bool,
               rngs) -> Array:
  for i, resnet in enumerate(level.resnets):
    h = _run(resnet, h, level.remat, deterministic, rngs)
    if level.attentions:
      h = _run(level.attentions[i], h, level.remat, deterministic, rngs)
  for resample in resamplers:
    h = _run(resample, h, level.remat, deterministic, rngs)
  return h


class DownBlock(nnx.Module):
  """One encoder level: ResNet blocks (with attention at listed resolutions), then a downsampler."""

  def __init__(self, cin: int, cout: int, res: int, add_down: bool, cfg: AutoencoderConfig, *,
               rngs: nnx.Rngs):
    self.resnets, self.attentions = _level(cin, cout, cfg.num_res_blocks, res, cfg, rngs)
    self.downsamplers = nnx.List([Downsample(cout, cfg, rngs=rngs)] if add_down else [])
    self.remat = cfg.remat == "block"

  def __call__(self, h: Array, deterministic: bool, rngs) -> Array:
    return _run_level(self, self.downsamplers, h, deterministic, rngs)


class UpBlock(nnx.Module):
  """One decoder level: num_res_blocks + 1 ResNet blocks (attention where listed), then upsampling."""

  def __init__(self, cin: int, cout: int, res: int, add_up: bool, cfg: AutoencoderConfig, *,
               rngs: nnx.Rngs):
    self.resnets, self.attentions = _level(cin, cout, cfg.num_res_blocks + 1, res, cfg, rngs)
    self.upsamplers = nnx.List([Upsample(cout, cfg, rngs=rngs)] if add_up else [])
    self.remat = cfg.remat == "block"

  def __call__(self, h: Array, deterministic: bool, rngs) -> Array:
    return _run_level(self, self.upsamplers, h, deterministic, rngs)


class MidBlock(nnx.Module):
  """ResNet -> single-head attention -> ResNet at the lowest resolution."""

  def __init__(self, channels: int, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([AttnBlock(channels, cfg, rngs=rngs)] if cfg.mid_attention else [])
    self.remat = cfg.remat == "block"

  def __call__(self, h: Array, deterministic: bool, rngs) -> Array:
    h = _run(self.resnets[0], h, self.remat, deterministic, rngs)
    for attn in self.attentions:
      h = _run(attn, h, self.remat, deterministic, rngs)
    return _run(self.resnets[1], h, self.remat, deterministic, rngs)


class Encoder(nnx.Module):
  """Images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2*z_channels] (or z_channels)."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    widths = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, cfg.dtype, rngs)
    blocks, cin, res = [], cfg.ch, cfg.resolution
    for level, cout in enumerate(widths):
      last = level == len(widths) - 1
      blocks.append(DownBlock(cin, cout, res, not last, cfg, rngs=rngs))
      cin = cout
      res = res if last else res // 2
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(widths[-1], cfg, rngs=rngs)
    self.conv_norm_out = GroupNorm(widths[-1], cfg.norm_groups, rngs=rngs)
    out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    self.conv_out = _conv(widths[-1], out, 3, cfg.dtype, rngs)
    self.dtype = cfg.dtype
    self.remat = cfg.remat == "level"

  def features(self, x: Array, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """The activations that enter `conv_out` (after the last GN and SiLU)."""
    h = self.conv_in(x.astype(self.dtype))
    for block in self.down_blocks:
      h = _run(block, h, self.remat, deterministic, rngs)
    h = _run(self.mid_block, h, self.remat, deterministic, rngs)
    return nnx.silu(self.conv_norm_out(h))

  def __call__(self, x: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    return self.conv_out(self.features(x, deterministic, rngs))


class Decoder(nnx.Module):
  """Latents [B, h, w, z_channels] -> images [B, h*f, w*f, out_channels] (no output activation)."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    widths = [cfg.ch * m for m in cfg.ch_mult][::-1]
    res = cfg.resolution // 2 ** (len(widths) - 1)
    self.conv_in = _conv(cfg.z_channels, widths[0], 3, cfg.dtype, rngs)
    self.mid_block = MidBlock(widths[0], cfg, rngs=rngs)
    blocks, cin = [], widths[0]
    for i, cout in enumerate(widths):
      last = i == len(widths) - 1
      blocks.append(UpBlock(cin, cout, res, not last, cfg, rngs=rngs))
      cin = cout
      res = res if last else res * 2
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(widths[-1], cfg.norm_groups, rngs=rngs)
    self.conv_out = _conv(widths[-1], cfg.out_channels, 3, cfg.dtype, rngs)
    self.dtype = cfg.dtype
    self.remat = cfg.remat == "level"

  def features(self, z: Array, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """The activations that enter `conv_out` (after the last GN and SiLU)."""
    h = self.conv_in(z.astype(self.dtype))
    h = _run(self.mid_block, h, self.remat, deterministic, rngs)
    for block in self.up_blocks:
      h = _run(block, h, self.remat, deterministic, rngs)
    return nnx.silu(self.conv_norm_out(h))

  def __call__(self, z: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    return self.conv_out(self.features(z, deterministic, rngs)).astype(norms.stat_dtype(self.dtype))


@jax.tree_util.register_pytree_node_class
class DiagonalGaussian:
  """The posterior q(z|x) = N(mean, exp(logvar)); arrays are [B, h, w, z_channels] float32
  (float64 for float64 moments).

  A pytree, so it can leave jit and grad as an auxiliary output.
  """

  def __init__(self, moments: Array):
    mean, logvar = jnp.split(moments.astype(norms.stat_dtype(moments.dtype)), 2, axis=-1)
    self.mean = mean
    self.logvar = jnp.clip(logvar, -30.0, 20.0)

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def tree_flatten(self):
    return (self.mean, self.logvar), None

  @classmethod
  def tree_unflatten(cls, _, children):
    obj = object.__new__(cls)
    obj.mean, obj.logvar = children
    return obj

  def sample(self, rng: Array) -> Array:
    """A reparameterized draw mean + std * eps, differentiable in mean and logvar.

    eps is drawn in float32 whatever the posterior's dtype, so a float64 run (the float64 yardstick
    of tests/numerics_test.py) draws the same numbers as a float32 one."""
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
    return self.mean + self.std * eps.astype(self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl_per_element(self) -> Array:
    """KL(q || N(0, I)) per latent element, [B, h, w, c]."""
    return 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)

  def kl(self) -> Array:
    """KL(q || N(0, I)) per image, summed over latent elements: [B]."""
    return jnp.sum(self.kl_per_element(), axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
  """Encoder + quant_conv -> DiagonalGaussian; post_quant_conv + Decoder -> reconstruction."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    moments = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    self.quant_conv = _conv(moments, moments, 1, cfg.dtype, rngs) if cfg.double_z else None
    self.post_quant_conv = _conv(cfg.z_channels, cfg.z_channels, 1, cfg.dtype, rngs)

  def encode(self, x: Array, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> DiagonalGaussian:
    """Images [B, H, W, 3] in [-1, 1] -> posterior over latents [B, H/f, W/f, z_channels]."""
    return self.posterior(self.encoder(x, deterministic, rngs))

  def posterior(self, moments: Array) -> DiagonalGaussian:
    """q(z|x) from the encoder's output (its conv_out's) [B, h, w, 2 * z_channels or z_channels]."""
    if self.quant_conv is None:
      # Without double_z the encoder predicts only the mean: a deterministic autoencoder.
      return DiagonalGaussian(jnp.concatenate([moments, jnp.full_like(moments, -30.0)], -1))
    return DiagonalGaussian(self.quant_conv(moments))

  def decode(self, z: Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    """Latents [B, h, w, z_channels] -> images [B, h*f, w*f, 3] (float32, roughly [-1, 1])."""
    return self.decoder(self.post_quant_conv(z.astype(self.config.dtype)), deterministic, rngs)

  def __call__(self, x: Array, sample_rng: Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[Array, DiagonalGaussian]:
    """Reconstructs x from a posterior sample (or its mode when `sample_rng` is None)."""
    posterior = self.encode(x, deterministic, rngs)
    z = posterior.mode() if sample_rng is None else posterior.sample(sample_rng)
    return self.decode(z, deterministic, rngs), posterior

  def forward_with_features(self, x: Array, sample_rng: Array | None, deterministic: bool = True,
                            rngs: nnx.Rngs | None = None, noise: Array | None = None
                            ) -> tuple[Array, DiagonalGaussian, Array]:
    """Like __call__ with a sample, also returning the input h of the decoder's last conv, so the
    gradient of any loss of the output w.r.t. that conv's kernel is one cheap VJP away.

    `noise` [B, h, w, z_channels] replaces the draw from `sample_rng` (z = mean + std * noise):
    gradient accumulation draws it once for the whole batch, so micro-batches see the same noise.
    """
    posterior = self.encode(x, deterministic, rngs)
    sample = (posterior.sample(sample_rng) if noise is None else
              posterior.mean + posterior.std * noise)
    z = self.post_quant_conv(sample.astype(self.config.dtype))
    h = self.decoder.features(z, deterministic, rngs)
    return self.decoder.conv_out(h).astype(norms.stat_dtype(h.dtype)), posterior, h
