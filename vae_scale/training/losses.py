"""Pure loss and metric functions of the KL autoencoder. Images are NHWC float in [-1, 1].

Losses are computed in float32 (`norms.stat_dtype`: float64 when given float64, for the float64
yardstick of tests/numerics_test.py); metrics in float32.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import dm_pix
import jax
import jax.numpy as jnp

from vae_scale.models.autoencoder import DiagonalGaussian
from vae_scale.models.norms import stat_dtype

Array = jax.Array


def to_unit_range(x: Array) -> Array:
  """Maps images from [-1, 1] to [0, 1] (values outside are clipped, as a viewer would)."""
  return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def l1_loss(x: Array, x_hat: Array) -> Array:
  """Mean absolute error per element. x, x_hat: [B, H, W, C] in [-1, 1]. Returns a scalar."""
  dtype = stat_dtype(jnp.result_type(x, x_hat))
  return jnp.mean(jnp.abs(x.astype(dtype) - x_hat.astype(dtype)))


def ssim(x: Array, x_hat: Array) -> Array:
  """SSIM per image (11x11 Gaussian window, sigma 1.5) on images mapped to [0, 1]: [B].

  The reconstruction is not clipped before the loss (its gradient must not vanish outside
  [-1, 1]); only the mapping to [0, 1] is applied, with data range 1.
  """
  dtype = stat_dtype(jnp.result_type(x, x_hat))
  a = (x.astype(dtype) + 1.0) * 0.5
  b = (x_hat.astype(dtype) + 1.0) * 0.5
  return dm_pix.ssim(a, b, max_val=1.0, filter_size=11, filter_sigma=1.5)


def ssim_loss(x: Array, x_hat: Array) -> Array:
  """1 - mean SSIM over the batch (a scalar in [0, 2])."""
  return 1.0 - jnp.mean(ssim(x, x_hat))


def kl_loss(posterior: DiagonalGaussian) -> Array:
  """Closed-form KL(q(z|x) || N(0, I)) per image (summed over latent elements), batch mean."""
  return jnp.mean(posterior.kl())


def kl_per_channel(posterior: DiagonalGaussian) -> Array:
  """KL per latent channel, summed over positions and averaged over the batch: [C].

  A channel whose KL sits near 0 carries no information (posterior collapse).
  """
  return jnp.mean(jnp.sum(posterior.kl_per_element(), axis=(1, 2)), axis=0)


def kl_weight_at(step: Array | int, kl_weight: float, warmup_steps: int) -> Array:
  """KL weight after a linear warm-up from 0 over `warmup_steps` (0 = no warm-up)."""
  if warmup_steps <= 0:
    return jnp.asarray(kl_weight, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return kl_weight * frac


REDUCTIONS = ("mean", "ldm_sum")
PerceptualFn = Callable[[Array, Array], Array]  # (x_hat, x) [B, H, W, 3] in [-1, 1] -> [B].


def l2_loss(x: Array, x_hat: Array) -> Array:
  """Mean squared error per element. x, x_hat: [B, H, W, C] in [-1, 1]. Returns a scalar."""
  dtype = stat_dtype(jnp.result_type(x, x_hat))
  return jnp.mean(jnp.square(x.astype(dtype) - x_hat.astype(dtype)))


def reconstruction_loss(x: Array, x_hat: Array, *, l1_weight: float, ssim_weight: float,
                        l2_weight: float = 0.0, perceptual_weight: float = 0.0,
                        perceptual_fn: PerceptualFn | None = None, reduction: str = "mean"
                        ) -> tuple[Array, dict[str, Array]]:
  """The weighted reconstruction term: L1 + L2 + (1 - SSIM) + LPIPS, in the units of `reduction`.

  Per image b with N = H * W * C elements, as LDM's LPIPSWithDiscriminator builds it (per-image
  terms are broadcast to every element before the sum):

    rec_b = sum over elements of [l1_weight |x - x_hat| + l2_weight (x - x_hat)^2
                                  + ssim_weight (1 - SSIM_b) + perceptual_weight LPIPS_b]

  'ldm_sum': rec = mean_b rec_b (LDM's nll_loss = sum / B, logvar 0);
  'mean': rec = mean_b rec_b / N = l1_weight mean|d| + l2_weight mean d^2 + ssim_weight (1 - mean
  SSIM) + perceptual_weight mean LPIPS (per-element means, the default).

  Args:
    x: inputs [B, H, W, C] in [-1, 1].
    x_hat: reconstructions [B, H, W, C] (not clipped: gradients must not vanish outside [-1, 1]).
    l1_weight, ssim_weight, l2_weight, perceptual_weight: non-negative weights; a term whose
      weight is 0 is not computed (SSIM, LPIPS) or only reported (L1, L2).
    perceptual_fn: per-image LPIPS (x_hat, x) -> [B]; required when perceptual_weight > 0.
    reduction: one of REDUCTIONS.

  Returns:
    (rec, terms): rec a scalar; terms `l1`, `l2` (per-element means), `ssim_loss` (1 - mean SSIM),
    `lpips` (batch mean; 0 when off) and `rec_loss` (= rec).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction {reduction!r}: use one of {REDUCTIONS}")
  zero = jnp.zeros((), jnp.float32)
  l1, l2 = l1_loss(x, x_hat), l2_loss(x, x_hat)
  s = ssim_loss(x, x_hat) if ssim_weight else zero
  p = zero
  if perceptual_weight:
    if perceptual_fn is None:
      raise ValueError("perceptual_weight > 0 needs perceptual_fn (LPIPS)")
    p = jnp.mean(perceptual_fn(x_hat, x).astype(jnp.float32))
  rec = l1_weight * l1 + l2_weight * l2 + ssim_weight * s + perceptual_weight * p
  if reduction == "ldm_sum":
    rec = rec * math.prod(x.shape[1:])
  return rec, {"l1": l1, "l2": l2, "ssim_loss": s, "lpips": p, "rec_loss": rec}


def kl_term(posterior: DiagonalGaussian, reduction: str = "mean") -> Array:
  """The KL term the loss weights: 'mean' per latent element (mean over B, h, w, c, so kl_weight does
  not depend on the image size); 'ldm_sum' LDM's per-image sum over h, w, c, batch mean."""
  if reduction == "ldm_sum":
    return kl_loss(posterior)
  return jnp.mean(posterior.kl_per_element())


def autoencoder_loss(x: Array, x_hat: Array, posterior: DiagonalGaussian, *, l1_weight: float,
                     ssim_weight: float, kl_weight: Array | float, l2_weight: float = 0.0,
                     perceptual_weight: float = 0.0, perceptual_fn: PerceptualFn | None = None,
                     reduction: str = "mean") -> tuple[Array, Mapping[str, Array]]:
  """The weighted reconstruction term (`reconstruction_loss`) + kl_weight * `kl_term`.

  With reduction 'mean' (the default) everything is a per-element mean: LDM's kl_weight 1e-6 on
  summed units is 1e-6 * latent elements / image elements (2.0833e-8 for 256x256x3 <-> 32x32x4).
  With 'ldm_sum' the loss is LDM's exactly: sum(rec) / B + kl_weight * (KL summed per image,
  batch mean), kl_weight 1e-6.

  Args:
    x: inputs [B, H, W, C] in [-1, 1].
    x_hat: reconstructions [B, H, W, C].
    posterior: q(z|x) with arrays [B, h, w, c].
    l1_weight, ssim_weight, kl_weight, l2_weight, perceptual_weight: non-negative weights.
    perceptual_fn, reduction: see `reconstruction_loss`.

  Returns:
    (loss, terms) with the terms of `reconstruction_loss`, `kl` (per image), `kl_per_element`
    and `kl_weight`.
  """
  rec, terms = reconstruction_loss(x, x_hat, l1_weight=l1_weight, ssim_weight=ssim_weight,
                                   l2_weight=l2_weight, perceptual_weight=perceptual_weight,
                                   perceptual_fn=perceptual_fn, reduction=reduction)
  return with_kl(rec, terms, posterior, kl_weight, reduction)


def with_kl(rec: Array, terms: Mapping[str, Array], posterior: DiagonalGaussian,
            kl_weight: Array | float, reduction: str = "mean"
            ) -> tuple[Array, dict[str, Array]]:
  """rec + kl_weight * `kl_term`, and `terms` with `kl` (per image), `kl_per_element`, `kl_weight`.

  Args:
    rec, terms: the output of `reconstruction_loss`.
    posterior: q(z|x) with arrays [B, h, w, c].
    kl_weight: its weight (after any warm-up).
    reduction: the reconstruction term's reduction (see `kl_term`).
  """
  loss = rec + kl_weight * kl_term(posterior, reduction)
  return loss, dict(terms, kl=kl_loss(posterior),
                    kl_per_element=jnp.mean(posterior.kl_per_element()),
                    kl_weight=jnp.asarray(kl_weight, jnp.float32))


def psnr(x: Array, x_hat: Array) -> Array:
  """PSNR in dB per image of reconstructions clipped to [-1, 1], measured in [0, 1]: [B]."""
  return dm_pix.psnr(to_unit_range(x), to_unit_range(x_hat))


def ssim_metric(x: Array, x_hat: Array) -> Array:
  """SSIM per image of reconstructions clipped to [-1, 1] (for evaluation): [B]."""
  return dm_pix.ssim(to_unit_range(x), to_unit_range(x_hat), max_val=1.0)


# ----------------------------------------------------------------------------- adversarial


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: Array) -> Array:
  """-mean D(x_hat)."""
  return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad: Array, g_grad: Array, disc_weight: float) -> Array:
  """LDM's d_weight = ||grad_W rec|| / (||grad_W g|| + 1e-4), clipped to [0, 1e4], no gradient.

  Args:
    rec_grad: gradient of the reconstruction loss w.r.t. the decoder's last kernel W.
    g_grad: gradient of the generator loss w.r.t. the same W.
    disc_weight: multiplier (config.disc.weight).
  """
  w = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)
