r"""KL-f8 with LDM's own loss (`autoencoder_kl_32x32x4`'s LPIPSWithDiscriminator), exactly.

configs/ldm_f8.py with the reconstruction term LDM trains with instead of this product's SSIM:

  loss = sum(|x - x_hat| + 1.0 * LPIPS_b) / B + 1e-6 * KL (summed per image, batch mean)
         + d_weight * disc_factor * g_loss     (hinge PatchGAN, disc.weight 0.5)

with LPIPS-VGG v0.1 per image broadcast to every pixel before the sum, d_weight taken on that whole
term, the discriminator on from the step whose 0-based index is disc.start_step = 50_001 (LDM's
disc_start, compared with a 0-based global step as taming-transformers does), Adam (0.5, 0.9) for
both networks at 4.5e-6 x global batch. Make the LPIPS weights once, then train:

  python -m vae_scale.convert lpips --out=lpips_vgg.safetensors
  python -m vae_scale.main --config=configs/ldm_f8_lpips.py --workdir=DIR \
      --config.loss.lpips_weights=lpips_vgg.safetensors \
      --config.data.source=folder --config.data.path=/data/images
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldm_f8  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  """Returns ldm_f8 with L1 + LPIPS + KL 1e-6 in LDM's summed units."""
  config = ldm_f8.get_config()
  config.loss.reduction = "ldm_sum"
  config.loss.l1_weight = 1.0
  config.loss.ssim_weight = 0.0
  config.loss.l2_weight = 0.0
  config.loss.perceptual_weight = 1.0  # LDM's perceptual_weight.
  config.loss.lpips_weights = ""  # Required: --config.loss.lpips_weights=FILE (see above).
  config.loss.kl_weight = 1e-6  # LDM's kl_weight, in summed units (reduction=ldm_sum).
  # Unchanged from ldm_f8 (LDM's values): hinge discriminator from disc.start_step = 50_001 with
  # disc.weight 0.5 and factor 1.0; Adam b = (0.5, 0.9); learning rates 4.5e-6 x global batch.
  # LDM kept no EMA; ldm_f8's (ema_decay 0.9999) only adds averaged weights next to the trained
  # ones (evaluate --weights=params scores the trained ones).
  config.optimizer.learning_rate = 4.5e-6 * config.global_batch_size
  config.disc.learning_rate = 4.5e-6 * config.global_batch_size
  return config
