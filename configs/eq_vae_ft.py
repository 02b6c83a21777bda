r"""EQ-VAE (zelaki/eqvae, ICML 2025): fine-tune an imported SD VAE to be scale and rotation
equivariant.

With probability 0.5 a step is a tau step: the latent sample z and the image x are both down-scaled
by a scale s (bilinear) and turned by 1, 2 or 3 quarter turns, and the decoder must reconstruct
tau(x) from tau(z) with the step's whole loss (L1 + LPIPS, the KL of the untransformed posterior,
the adversarial term); otherwise with probability 0.25 it reconstructs the image down-scaled by s
("prior preservation"), else the image itself (train_eqvae/configs/eqvae_config.yaml,
ldm/models/autoencoder.py). The whole LDM KL-f8 autoencoder trains (not only the decoder), with
LDM's loss and a hinge PatchGAN from the first step. EQ-VAE reports, for SD-VAE fine-tuned 5
epochs on OpenImages, rFID 0.82 / PSNR 25.95, and for its released ImageNet model rFID 0.55 /
PSNR 26.15 (and diffusion models on its latents train faster: its point).

  python -m vae_scale.convert lpips --out=lpips_vgg.safetensors
  python -m vae_scale.main --config=configs/eq_vae_ft.py --workdir=DIR \
      --config.init_from=/models/sd-vae --config.loss.lpips_weights=lpips_vgg.safetensors \
      --config.data.source=folder --config.data.path=/data/images

Scales: each scale is its own image size, so its own compiled branch of the step (two per scale:
the tau and the low-resolution step). The default is the three scales of EQ-VAE's README (7
branches); EQ-VAE's code draws k/32 for k = 8 ... 31 (24 scales, 49 branches: a long compile),
selected with `configs/eq_vae_ft.py:code_scales`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldm_f8_lpips  # pylint: disable=g-import-not-at-top,wrong-import-position

README_SCALES = (0.25, 0.5, 0.75)
CODE_SCALES = tuple(k / 32 for k in range(8, 32))  # equivariance.EQ_VAE_SCALES.


def get_config(variant: str = ""):
  """Returns the EQ-VAE fine-tune of ldm_f8 ('' = README's scales | 'code_scales')."""
  if variant not in ("", "code_scales"):
    raise ValueError(f"configs/eq_vae_ft.py:{variant}: use no variant or code_scales")
  config = ldm_f8_lpips.get_config()  # L1 + LPIPS + 1e-6 KL in LDM's units, hinge PatchGAN 0.5.
  config.init_from = ""  # Required: the SD VAE to fine-tune (a diffusers folder, a .safetensors).
  config.freeze_encoder = False  # The whole autoencoder trains: the latent space itself changes.
  config.disc.start_step = 0  # EQ-VAE's disc_start: 0 (the discriminator from the first step).
  config.loss.equivariance_weight = 1.0  # The tau step's reconstruction term as a plain one's.
  config.loss.equivariance_prob = 0.5  # p_prior.
  config.loss.equivariance_low_res_prob = 0.25  # p_prior_s.
  config.loss.equivariance_scales = CODE_SCALES if variant == "code_scales" else README_SCALES
  config.loss.equivariance_rotations = (1, 2, 3)
  # Adam (0.5, 0.9) at LDM's 4.5e-6 x global batch (EQ-VAE: 10 images x 8 GPUs x 2 accumulated
  # = 160, 7.2e-4), for both networks; no EMA in its training code.
  config.global_batch_size = 160
  config.optimizer.learning_rate = 4.5e-6 * config.global_batch_size
  config.disc.learning_rate = 4.5e-6 * config.global_batch_size
  config.ema_decay = 0.0
  # 5 epochs of OpenImages' 1.74M training images at 160 per step; set it for your data.
  config.num_train_steps = 54_500
  return config
