r"""Stable Diffusion's ft-MSE VAE recipe: fine-tune an imported SD VAE's decoder on MSE + 0.1 LPIPS.

What Stability published for `sd-vae-ft-mse`: the original KL-f8 VAE's decoder fine-tuned (encoder
frozen, so the latent space a diffusion model lives in is unchanged) with MSE + 0.1 * LPIPS, EMA
weights, global batch 192 (16 A100s). Start from the SD VAE you have (a diffusers folder or an
LDM/SD .safetensors, or `python -m vae_scale.convert import` output):

  python -m vae_scale.convert lpips --out=lpips_vgg.safetensors
  python -m vae_scale.main --config=configs/sd_ft_mse.py --workdir=DIR \
      --config.init_from=/models/sd-vae --config.loss.lpips_weights=lpips_vgg.safetensors \
      --config.data.source=folder --config.data.path=/data/images

The learning rate is not published; LDM's rule (4.5e-6 x global batch) is the default here.
Lower it for small data sets.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldm_f8  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  """Returns ldm_f8 as a decoder-only fine-tune on MSE + 0.1 LPIPS (init_from required)."""
  config = ldm_f8.get_config()
  config.init_from = ""  # Required: the SD VAE to fine-tune (validation refuses it empty).
  config.freeze_encoder = True  # Decoder (and post_quant_conv) only.
  # LDM's units (the SD ft runs used LDM's code): sum over pixels of (x - x_hat)^2 + 0.1 LPIPS_b,
  # per image, batch mean. No L1, no SSIM.
  config.loss.reduction = "ldm_sum"
  config.loss.l1_weight = 0.0
  config.loss.ssim_weight = 0.0
  config.loss.l2_weight = 1.0
  config.loss.perceptual_weight = 0.1
  config.loss.lpips_weights = ""  # Required: --config.loss.lpips_weights=FILE (see above).
  # KL 0: with the encoder frozen the KL depends on frozen weights only, so it has no gradient and
  # any weight (SD's original 1e-6) trains the same decoder; 0 keeps the logged loss the objective.
  config.loss.kl_weight = 0.0
  # Stability names only MSE + 0.1 LPIPS for ft-MSE; the adversarial term stays off here (enable
  # it with --config.disc.enabled=True --config.disc.start_step=0).
  config.disc.enabled = False
  config.ema_decay = 0.9999  # EMA weights, as both SD fine-tunes report.
  config.global_batch_size = 192
  config.optimizer.learning_rate = 4.5e-6 * config.global_batch_size
  config.disc.learning_rate = 4.5e-6 * config.global_batch_size
  return config
