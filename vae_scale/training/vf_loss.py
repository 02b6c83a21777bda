"""VA-VAE's vision-foundation (VF) alignment loss, as LightningDiT's `vavae/` computes it.

Facts taken from hustvl/LightningDiT (vavae/ldm/models/autoencoder.py, vavae/ldm/modules/losses/
contperceptual.py, vavae/configs/f16d32_vfdinov2*.yaml):

* z is the posterior *sample* (AutoencoderKL.forward samples during training), [B, h, w, c].
* Its configs set `reverse_proj: true`: z is projected by a trained 1x1 conv without bias from the
  latent width c to DINOv2's width D (Conv2d(c, D, 1, bias=False), PyTorch's default init
  U(-1/sqrt(c), 1/sqrt(c))), trained by the autoencoder's optimizer; f are DINOv2's patch tokens
  on the latent grid, no gradient.
* distance-matrix term: z' and f unit-normalised over channels at every position (F.normalize,
  eps 1e-12); per image the [hw, hw] cosine matrices; mean over images and all (i, j) pairs (the
  diagonal included) of relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - margin_distmat).
* cosine term: mean over images and positions of relu(1 - margin_cos - cos(f, z')) (cosine
  along channels, F.cosine_similarity eps 1e-8).
* vf = distmat_weight * distmat + cos_weight * cos (both 1).
* adaptive weight: ||dnll/dW|| / (||dvf/dW|| + 1e-4), clamped to [0, 1e8], no gradient, times
  vf_weight; W is the encoder's last conv kernel (encoder.conv_out); nll is the reconstruction
  term (L1 + LPIPS summed per image, averaged over the batch; LightningDiT's logvar is not trained
  and stays 0). The autoencoder's loss adds adaptive_weight * vf.
* stages (f16d32_vfdinov2_long.yaml): vf_weight 0.5 with margins 0 / 0 (100 epochs), then 0.1
  (15 epochs), then margins cos 0.5, distmat 0.25 (15 epochs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default.
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default.
ADAPTIVE_EPS = 1e-4  # Added to ||dvf/dW|| (as LDM's d_weight adds it to the generator's).
ADAPTIVE_MAX = 1e8  # LightningDiT clamps the ratio to [0, 1e8] (LDM's d_weight: 1e4).


@dataclasses.dataclass(frozen=True)
class VFLossConfig:
  """The VF loss's settings (defaults: LightningDiT's third stage).

  Attributes:
    weight: vf_weight, >= 0 (0 turns the term off).
    margin_cos: m1 in relu(1 - m1 - cos), in [0, 2).
    margin_distmat: m2 in relu(|cos_z - cos_f| - m2), in [0, 2).
    cos_weight, distmat_weight: the two terms' weights inside vf (1, 1).
    adaptive: scale by ||dnll/dW|| / (||dvf/dW|| + 1e-4) (LightningDiT's `adaptive_vf: true`).
  """

  weight: float = 0.1
  margin_cos: float = 0.5
  margin_distmat: float = 0.25
  cos_weight: float = 1.0
  distmat_weight: float = 1.0
  adaptive: bool = True

  @classmethod
  def from_config(cls, config: Any) -> "VFLossConfig":
    """From a run config's loss.vf_{weight, margin_cos, margin_distmat, adaptive}."""
    loss = config.loss
    return cls(weight=float(loss.vf_weight), margin_cos=float(loss.vf_margin_cos),
               margin_distmat=float(loss.vf_margin_distmat), adaptive=bool(loss.vf_adaptive))


def init_projection(key: Array, z_channels: int, feature_dim: int) -> Array:
  """The 1x1 projection's kernel as PyTorch initialises Conv2d(z_channels, feature_dim, 1).

  kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = z_channels.

  Args:
    key: a jax PRNG key.
    z_channels: latent channels c (32 for f16d32).
    feature_dim: DINOv2's width D (1024 for ViT-L).

  Returns:
    [c, D] float32 (no bias, as LightningDiT's reverse projection).
  """
  bound = 1.0 / z_channels ** 0.5
  return jax.random.uniform(key, (z_channels, feature_dim), jnp.float32, -bound, bound)


def project(kernel: Array, z: Array) -> Array:
  """z' = the 1x1 conv of z: [B, h, w, c] x [c, D] -> [B, h, w, D] float32."""
  return jnp.einsum("bhwc,cd->bhwd", z.astype(jnp.float32), kernel.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _norm(x: Array) -> Array:
  """L2 norm over the last axis, keepdims, with a finite (zero) derivative at the zero vector
  (torch's subgradient there); sqrt's derivative is infinite at 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _unit(x: Array, eps: float) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(_norm(x), eps)


def cosine_margin_loss(z_proj: Array, features: Array, margin: float) -> Array:
  """mean over images and positions of relu(1 - margin - cos(features, z_proj)).

  Args:
    z_proj: [B, h, w, D] projected latents.
    features: [B, h, w, D] DINOv2 patch tokens (any float dtype).
    margin: m1 >= 0: positions already closer than cos = 1 - m1 add nothing.

  Returns:
    float32 scalar in [0, 2 - margin].
  """
  cos = jnp.sum(_unit(features, COSINE_EPS) * _unit(z_proj, COSINE_EPS), axis=-1)
  return jnp.mean(jax.nn.relu(1.0 - margin - cos))


def _cosine_matrix(x: Array) -> Array:
  """[B, h, w, D] -> [B, hw, hw] cosines between all pairs of positions of each image."""
  u = _unit(x.reshape(x.shape[0], -1, x.shape[-1]), NORMALIZE_EPS)
  return jnp.einsum("bid,bjd->bij", u, u, precision=jax.lax.Precision.HIGHEST)


def distance_matrix_margin_loss(z_proj: Array, features: Array, margin: float) -> Array:
  """mean over images and all (i, j) position pairs of relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m2).

  Args:
    z_proj: [B, h, w, D] projected latents.
    features: [B, h, w, D] DINOv2 patch tokens.
    margin: m2 >= 0: differences of cosine up to m2 add nothing.

  Returns:
    float32 scalar in [0, 2].
  """
  diff = jnp.abs(_cosine_matrix(z_proj) - _cosine_matrix(features))
  return jnp.mean(jax.nn.relu(diff - margin))


def vf_loss(z_proj: Array, features: Array, cfg: VFLossConfig) -> tuple[Array, dict[str, Array]]:
  """LightningDiT's vf = distmat_weight * distmat + cos_weight * cos (before the adaptive weight).

  Args:
    z_proj: [B, h, w, D] projected latent samples (`project`).
    features: [B, h, w, D] DINOv2 patch tokens on the same grid (gradient stopped here).
    cfg: margins and term weights.

  Returns:
    (vf, {'vf_cos': cos term, 'vf_distmat': distance-matrix term}), float32 scalars.
  """
  if z_proj.shape != features.shape:
    raise ValueError(f"projected latents {z_proj.shape} and DINOv2 features {features.shape} "
                     "must have the same [B, h, w, D] shape")
  features = jax.lax.stop_gradient(features)
  cos = cosine_margin_loss(z_proj, features, cfg.margin_cos)
  distmat = distance_matrix_margin_loss(z_proj, features, cfg.margin_distmat)
  return cfg.distmat_weight * distmat + cfg.cos_weight * cos, {"vf_cos": cos,
                                                              "vf_distmat": distmat}


def adaptive_vf_weight(nll_grad: Array, vf_grad: Array, vf_weight: float) -> Array:
  """LightningDiT's vf weight: ||nll_grad|| / (||vf_grad|| + 1e-4), clamped to [0, 1e8], times
  vf_weight, with no gradient.

  Args:
    nll_grad: d(reconstruction term)/dW, W the encoder's last conv kernel (any shape).
    vf_grad: d(vf)/dW, same shape.
    vf_weight: config.loss.vf_weight.

  Returns:
    float32 scalar >= 0.
  """
  ratio = (jnp.linalg.norm(nll_grad.astype(jnp.float32).ravel())
           / (jnp.linalg.norm(vf_grad.astype(jnp.float32).ravel()) + ADAPTIVE_EPS))
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX) * vf_weight)
