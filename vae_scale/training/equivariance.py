"""EQ-VAE's equivariance regulariser: random spatial transforms applied alike to latents and images.

Facts taken from zelaki/eqvae (train_eqvae/ldm/models/autoencoder.py, configs/eqvae_config.yaml):
once per training step (Python's `random`), with probability p_prior = 0.5 the step is an
equivariance step: a scale s drawn uniformly from {k / 32 : k = 8 ... 31} (isotropic) and a
rotation k drawn uniformly from {1, 2, 3} quarter turns; the posterior *sample* z is down-scaled by
`F.interpolate(z, scale_factor=s, mode='bilinear', align_corners=False)` then turned by
`torch.rot90(z, k, dims=[-1, -2])`, the image gets the same two operations, and the step's whole
loss (L1 + LPIPS, KL of the untransformed posterior, the adversarial term) is computed on
(tau(x), decode(tau(z))) instead of (x, decode(z)). Otherwise, with probability p_prior_s = 0.25
the image is down-scaled by a scale from the same set and reconstructed as usual ("prior
preservation" at low resolution), else the step is a plain one.

Down-scaled sizes must be whole: s * latent_size an integer (then s * image_size is too, and
PyTorch's floor(size * s) gives the same sizes and sampling positions as here). The scale set is
static (each scale is its own shape, so its own compiled branch); the draw is a pure function of a
jax key, so a resumed run draws the same transforms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from vae_scale.models import resample

Array = jax.Array
EQ_VAE_SCALES = tuple(k / 32 for k in range(8, 32))  # The code's set: 0.25, 0.28125, ... 0.96875.
README_SCALES = (0.25, 0.5, 0.75)  # The README's non-uniform option (3 compiled branches).
EQ_VAE_ROTATIONS = (1, 2, 3)
PLAIN, EQUIVARIANT, LOW_RES = 0, 1, 2  # Transform.mode values.


@dataclasses.dataclass(frozen=True)
class EquivarianceConfig:
  """The transform distribution (defaults: EQ-VAE's code).

  Attributes:
    prob: probability that a step is an equivariance step (p_prior), in [0, 1].
    low_res_prob: probability that a non-equivariance step reconstructs a down-scaled image
      (p_prior_s), in [0, 1].
    scales: down-scaling factors in (0, 1], each mapping the latent to whole pixels.
    rotations: quarter turns to draw from, a subset of {0, 1, 2, 3}.
  """

  prob: float = 0.5
  low_res_prob: float = 0.25
  scales: tuple[float, ...] = EQ_VAE_SCALES
  rotations: tuple[int, ...] = EQ_VAE_ROTATIONS

  @classmethod
  def from_config(cls, config: Any) -> "EquivarianceConfig":
    """From a run config's loss.equivariance_{prob, low_res_prob, scales, rotations}."""
    loss = config.loss
    return cls(prob=float(loss.equivariance_prob),
               low_res_prob=float(loss.equivariance_low_res_prob),
               scales=tuple(float(s) for s in loss.equivariance_scales),
               rotations=tuple(int(k) for k in loss.equivariance_rotations))


class Transform(NamedTuple):
  """One step's draw (int32 scalars, a pytree).

  Attributes:
    mode: PLAIN, EQUIVARIANT or LOW_RES.
    scale_index: index into `scales` (drawn in every mode; used by EQUIVARIANT and LOW_RES).
    rotation: quarter turns (used by EQUIVARIANT).
  """

  mode: Array
  scale_index: Array
  rotation: Array


def sample_transform(key: Array, cfg: EquivarianceConfig) -> Transform:
  """The step's transform, a pure function of `key` (jit-able; the same key, the same draw).

  Args:
    key: a jax PRNG key, e.g. fold_in(step key, a constant).
    cfg: the distribution.

  Returns:
    `Transform` of int32 scalars.
  """
  k_mode, k_low, k_scale, k_rot = jax.random.split(key, 4)
  mode = jnp.where(jax.random.uniform(k_mode) < cfg.prob, EQUIVARIANT,
                   jnp.where(jax.random.uniform(k_low) < cfg.low_res_prob, LOW_RES, PLAIN))
  rotations = jnp.asarray(cfg.rotations, jnp.int32)
  return Transform(mode=mode.astype(jnp.int32),
                   scale_index=jax.random.randint(k_scale, (), 0, len(cfg.scales), jnp.int32),
                   rotation=rotations[jax.random.randint(k_rot, (), 0, len(cfg.rotations))])


def downscale(x: Array, scale: float) -> Array:
  """`F.interpolate(x, scale_factor=scale, mode='bilinear', align_corners=False)` on NHWC.

  Args:
    x: [B, H, W, C].
    scale: a static factor in (0, 1].

  Returns:
    [B, floor(H * scale), floor(W * scale), C] in x's dtype.
  """
  size = (resample.scaled_size(x.shape[1], scale), resample.scaled_size(x.shape[2], scale))
  return resample.resize(x, size, "bilinear", scale_factor=(scale, scale))


def rotate(x: Array, k: Array | int) -> Array:
  """`torch.rot90(x, k, dims=[-1, -2])` of an NCHW tensor, on NHWC: k quarter turns from the
  width axis towards the height axis. A traced k needs a square x (every turn keeps the shape).

  Args:
    x: [B, H, W, C].
    k: quarter turns, static int or int32 scalar in [0, 3].
  """
  if isinstance(k, int):
    return jnp.rot90(x, k, axes=(2, 1))
  if x.shape[1] != x.shape[2]:
    raise ValueError(f"a traced rotation needs square images or latents, not {x.shape[1:3]}")
  turns = [jnp.rot90(x, q, axes=(2, 1)) for q in range(4)]
  # A select rather than lax.switch: XLA:CPU runs the ops of a conditional's branches many times
  # slower than the same ops outside one (BENCHMARKS.md); four turned copies are cheap.
  return jnp.select([k == q for q in range(4)], turns)


def transform_pair(z: Array, x: Array, scale: float, k: Array | int) -> tuple[Array, Array]:
  """(tau(z), tau(x)): down-scale, then rotate, each alike (EQ-VAE's order).

  Args:
    z: latent samples [B, h, w, c].
    x: images [B, h * f, w * f, 3].
    scale: static factor.
    k: quarter turns (static or traced).
  """
  return rotate(downscale(z, scale), k), rotate(downscale(x, scale), k)


@dataclasses.dataclass(frozen=True)
class View:
  """How a train step sees its batch: static, so each view is its own compiled step.

  Attributes:
    kind: PLAIN, EQUIVARIANT (decode tau(z), reconstruct tau(x)) or LOW_RES (the image
      down-scaled before encoding, then reconstructed).
    scale: the down-scaling factor of EQUIVARIANT and LOW_RES views (1 for PLAIN).
  """

  kind: int = PLAIN
  scale: float = 1.0

  @property
  def name(self) -> str:
    """'plain', 'tau0.5', 'low0.25', ...: the step variant's name."""
    return {PLAIN: "plain", EQUIVARIANT: f"tau{self.scale:g}",
            LOW_RES: f"low{self.scale:g}"}[self.kind]

  def input(self, x: Array) -> Array:
    """The images the encoder sees: [B, H, W, 3], or for LOW_RES [B, sH, sW, 3]."""
    return downscale(x, self.scale) if self.kind == LOW_RES else x

  def pair(self, z: Array, x: Array, rotation: Array | int) -> tuple[Array, Array]:
    """(latents to decode, images to reconstruct): (tau(z), tau(x)) for EQUIVARIANT, else (z, x)."""
    if self.kind == EQUIVARIANT:
      return transform_pair(z, x, self.scale, rotation)
    return z, x

  def metrics(self) -> dict[str, Array]:
    """The step's EQ metrics (1 or 0: their means over steps are the shares of each kind)."""
    one = lambda b: jnp.asarray(1.0 if b else 0.0, jnp.float32)
    return {"eq_tau_steps": one(self.kind == EQUIVARIANT),
            "eq_low_res_steps": one(self.kind == LOW_RES)}


PLAIN_VIEW = View()


def views(cfg: EquivarianceConfig) -> list[View]:
  """Every view of a run: plain, a tau view per scale, a low-resolution view per scale."""
  return ([PLAIN_VIEW] + [View(EQUIVARIANT, s) for s in cfg.scales] +
          [View(LOW_RES, s) for s in cfg.scales])


def view_of(t: Transform, cfg: EquivarianceConfig) -> View:
  """The view a concrete draw (host values) picks."""
  mode, index = int(t.mode), int(t.scale_index)
  return PLAIN_VIEW if mode == PLAIN else View(mode, cfg.scales[index])


def switch_on_scale(t: Transform, cfg: EquivarianceConfig,
                    build: Callable[[float], Callable[..., Any]], *operands: Any) -> Any:
  """`build(scales[t.scale_index])(*operands)`: one compiled branch per static scale, one run.

  Every branch must return the same shapes (scalar losses, parameter gradients).
  """
  return jax.lax.switch(t.scale_index, [build(s) for s in cfg.scales], *operands)


def equivariance_loss(t: Transform, cfg: EquivarianceConfig, z: Array, x: Array,
                      decode: Callable[[Array], Array],
                      reconstruction_loss: Callable[[Array, Array], Array]) -> Array:
  """EQ-VAE's reconstruction of tau(x) from tau(z) when `t` is an equivariance step, else 0.

  Args:
    t: the step's draw (`sample_transform`).
    cfg: the distribution it was drawn from.
    z: latent samples [B, h, w, c] (h == w when rotations are drawn).
    x: the images they encode, [B, h * f, w * f, 3] in [-1, 1].
    decode: latents [B, m, m, c] -> images [B, m * f, m * f, 3], for every scaled size m.
    reconstruction_loss: (target, reconstruction) -> float32 scalar (the step's own term).

  Returns:
    float32 scalar.
  """
  def build(scale: float) -> Callable[[Array, Array], Array]:
    def term(z: Array, x: Array) -> Array:
      z_t, x_t = transform_pair(z, x, scale, t.rotation)
      return reconstruction_loss(x_t, decode(z_t)).astype(jnp.float32)
    return term

  return jax.lax.cond(t.mode == EQUIVARIANT,
                      lambda z, x: switch_on_scale(t, cfg, build, z, x),
                      lambda z, x: jnp.zeros((), jnp.float32), z, x)
