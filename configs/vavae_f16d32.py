r"""VA-VAE (hustvl/LightningDiT `vavae/`): the f16, 32-channel KL-VAE aligned with DINOv2.

256x256x3 images <-> 16x16x32 latents. The VF loss (loss.vf_*) projects the latent sample by a
trained 1x1 conv to DINOv2 ViT-L/14's width and pulls it towards DINOv2's patch features of the
image (resized to 224 px: a 16x16 grid, the latent grid) with a marginal cosine and a marginal
distance-matrix term, weighted by ||grad rec|| / ||grad vf|| at the encoder's last conv x
vf_weight. LightningDiT trains it in three stages, each from the previous stage's weights with a
fresh optimizer (vavae/configs/f16d32_vfdinov2{,_long}.yaml); pick one with `:stageN`:

  stage1  vf_weight 0.5, margins 0 / 0       100 epochs of ImageNet (~500k steps of 256 images)
  stage2  vf_weight 0.1, margins 0 / 0        15 epochs (~75k steps)
  stage3  vf_weight 0.1, margins 0.5 / 0.25   15 epochs (~75k steps)

LightningDiT reports rFID 0.28 after these, and LightningDiT-XL on its latents FID 1.35
(ImageNet 256). Make the frozen networks' files once (DINOv2 from the transformers folder of
facebook/dinov2-large, e.g. a hub snapshot), then train, each stage from the last one's workdir:

  python -m vae_scale.convert lpips --out=lpips_vgg.safetensors
  python -m vae_scale.convert dinov2 --src=/models/dinov2-large --out=dinov2_l14.safetensors
  python -m vae_scale.main --config=configs/vavae_f16d32.py:stage1 --workdir=RUN1 \
      --config.loss.lpips_weights=lpips_vgg.safetensors \
      --config.loss.vf_weights=dinov2_l14.safetensors \
      --config.data.source=tfds --config.data.tfds_name=imagenet2012
  python -m vae_scale.main --config=configs/vavae_f16d32.py:stage2 --workdir=RUN2 \
      --config.init_from=RUN1 ...(the same flags)

`init_from` a run's workdir carries its weights and its VF projection (never exported: `convert
export` writes the autoencoder alone); the optimizers start fresh, as LightningDiT's stages do.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldm_f8  # pylint: disable=g-import-not-at-top,wrong-import-position

# LightningDiT's stages: (vf_weight, margin_cos, margin_distmat, steps, disc.start_step).
# Lightning's global_step counts both optimizers' steps (manual optimisation), so its disc_start
# 5001 is batch ~2,501, and disc_start 1 is the second batch. 5,005 steps of 256 make an epoch.
STAGES = {
    "stage1": (0.5, 0.0, 0.0, 500_500, 2_501),
    "stage2": (0.1, 0.0, 0.0, 75_075, 1),
    "stage3": (0.1, 0.5, 0.25, 75_075, 1),
}


def get_config(stage: str = "stage1"):
  """Returns the VA-VAE f16d32 recipe at `stage` (stage1 | stage2 | stage3)."""
  if stage not in STAGES:
    raise ValueError(f"configs/vavae_f16d32.py:{stage}: use one of {', '.join(STAGES)}")
  vf_weight, margin_cos, margin_distmat, steps, disc_start = STAGES[stage]
  config = ldm_f8.get_config()
  config.image_size = 256
  # -- The f16 autoencoder (vavae/configs/f16d32_vfdinov2.yaml ddconfig).
  config.model.ch = 128
  config.model.ch_mult = (1, 1, 2, 2, 4)  # Four downsamplings: f = 16.
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)  # Self-attention on the 16x16 level too.
  config.model.mid_attention = True
  config.model.z_channels = 32
  config.model.double_z = True
  config.model.dropout = 0.0
  config.model.dtype = "float32"  # Lightning's default precision (32).
  # -- LDM's LPIPSWithDiscriminator in its units: sum(|x - x_hat| + LPIPS) / B + 1e-6 KL.
  config.loss.reduction = "ldm_sum"
  config.loss.l1_weight = 1.0
  config.loss.ssim_weight = 0.0
  config.loss.l2_weight = 0.0
  config.loss.perceptual_weight = 1.0
  config.loss.lpips_weights = ""  # Required: --config.loss.lpips_weights=FILE (see above).
  config.loss.kl_weight = 1e-6
  # -- The VF loss (vavae/ldm/modules/losses/contperceptual.py).
  config.loss.vf_weight = vf_weight
  config.loss.vf_margin_cos = margin_cos
  config.loss.vf_margin_distmat = margin_distmat
  config.loss.vf_weights = ""  # Required: DINOv2 ViT-L/14 (see above).
  config.loss.vf_feature_dim = 1024  # ViT-L/14 without registers (timm's lvd142m weights).
  config.loss.vf_adaptive = True
  config.loss.vf_normalize = "none"  # LightningDiT hands DINOv2 the batch in [-1, 1].
  config.loss.vf_pos_antialias = True  # timm resamples position embeddings with antialias.
  # -- Hinge PatchGAN, 3 layers, batch norm, weight 0.5 (LDM's).
  config.disc.enabled = True
  config.disc.loss = "hinge"
  config.disc.n_layers = 3
  config.disc.norm = "batch"
  config.disc.weight = 0.5
  config.disc.factor = 1.0
  config.disc.start_step = disc_start
  # -- Adam (0.5, 0.9) at 1e-4 for both networks, not scaled by the batch; constant, no decay,
  # no clipping, no EMA (as LightningDiT trains it).
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.b1, config.optimizer.b2 = 0.5, 0.9
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.disc.learning_rate = 1e-4
  config.disc.b1, config.disc.b2 = 0.5, 0.9
  config.ema_decay = 0.0
  # Stages 2 and 3 start from the previous stage's run: --config.init_from=ITS_WORKDIR.
  config.init_from = ""
  config.global_batch_size = 256
  config.num_train_steps = steps
  return config
