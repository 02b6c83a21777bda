r"""The Stable Diffusion KL-f8 autoencoder recipe (LDM `autoencoder_kl_32x32x4`).

256x256x3 images <-> 32x32x4 latents, 83,653,863 parameters. Train with

  python -m vae_scale.main --config=configs/ldm_f8.py --workdir=DIR \
      --config.data.source=folder --config.data.path=/data/images

Every field can be overridden on the command line with `--config.FIELD=VALUE`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the KL-f8 recipe."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Root of all randomness: init, data order, crops, sampling.
  config.image_size = 256  # Square training resolution in pixels.

  # -- Autoencoder (LDM / diffusers AutoencoderKL layout) --------------------
  config.model = ml_collections.ConfigDict()
  config.model.in_channels = 3
  config.model.out_channels = 3
  config.model.ch = 128  # Channels of the first level.
  config.model.ch_mult = (1, 2, 4, 4)  # Per-level multiplier; len-1 downsamplings (f = 8).
  config.model.num_res_blocks = 2  # Per encoder level; the decoder uses num_res_blocks + 1.
  config.model.attn_resolutions = ()  # Feature-map sizes with self-attention (besides the mid block).
  config.model.mid_attention = True  # Single-head self-attention in the mid block.
  config.model.z_channels = 4  # Latent channels.
  config.model.double_z = True  # Encoder predicts mean and log-variance.
  config.model.norm_groups = 32  # GroupNorm groups (eps 1e-6).
  config.model.dropout = 0.0
  config.model.dtype = "float32"  # Computation dtype; parameters stay float32.
  config.model.remat = "none"  # Rematerialization: none | block | level.

  # -- Discriminator (taming-transformers NLayer PatchGAN) --------------------
  config.disc = ml_collections.ConfigDict()
  config.disc.enabled = True
  config.disc.start_step = 50_001  # Adversarial term and D updates from this step on.
  config.disc.weight = 0.5  # Multiplies the adaptive weight d_weight.
  config.disc.factor = 1.0  # disc_factor after start_step.
  config.disc.loss = "hinge"  # hinge | vanilla.
  config.disc.n_layers = 3
  config.disc.filters = 64
  config.disc.norm = "batch"  # batch (global-batch statistics) | group.
  config.disc.learning_rate = 2.88e-4
  config.disc.b1 = 0.5
  config.disc.b2 = 0.9

  # -- Loss --------------------------------------------------------------------
  # Reconstruction terms are per-element means of images in [-1, 1]. The KL term enters the loss
  # as a mean per latent element, so kl_weight = 1e-6 (LDM's weight on summed units) * 4096 / 196608.
  # (configs/ldm_f8_lpips.py is LDM's own loss: L1 + LPIPS in summed units, reduction=ldm_sum.)
  config.loss = ml_collections.ConfigDict()
  config.loss.l1_weight = 1.0
  config.loss.ssim_weight = 0.5  # On 1 - SSIM (11x11 Gaussian window, sigma 1.5, images in [0, 1]).
  config.loss.l2_weight = 0.0  # Squared error per element (SD ft-MSE's "MSE").
  # LPIPS-VGG v0.1 per image, broadcast to every element as LDM adds it; needs lpips_weights.
  config.loss.perceptual_weight = 0.0
  # LPIPS weights (safetensors): make once with `python -m vae_scale.convert lpips --out=FILE`.
  # Also gives evaluations an LPIPS column when set.
  config.loss.lpips_weights = ""
  # mean: per-element means (kl_weight per latent element); ldm_sum: LDM's units, the
  # reconstruction summed over pixels and the KL over latent elements, both averaged over images.
  config.loss.reduction = "mean"
  config.loss.kl_weight = 2.0833e-8
  config.loss.kl_warmup_steps = 0  # Linear KL-weight warm-up from 0; 0 = off.
  # VA-VAE's vision-foundation (VF) alignment (hustvl/LightningDiT; configs/vavae_f16d32.py): a
  # trained 1x1 projection of the latent sample to DINOv2's width is pulled towards DINOv2's patch
  # features of the image on the latent grid (marginal cosine + marginal distance-matrix terms),
  # weighted by ||grad rec|| / ||grad vf|| at the encoder's last conv x vf_weight. 0 = off; needs
  # an f16 (or coarser) autoencoder and vf_weights.
  config.loss.vf_weight = 0.0
  config.loss.vf_margin_cos = 0.0  # m1 in relu(1 - m1 - cos(proj(z), f)), in [0, 2).
  config.loss.vf_margin_distmat = 0.0  # m2 in relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m2).
  # DINOv2 weights (safetensors): `python -m vae_scale.convert dinov2 --src=HF_DIR --out=FILE`.
  config.loss.vf_weights = ""
  config.loss.vf_feature_dim = 1024  # DINOv2's width: 384 S, 768 B, 1024 L (LightningDiT), 1536 G.
  config.loss.vf_adaptive = True  # The adaptive weight above; False: vf_weight alone.
  config.loss.vf_normalize = "none"  # none: images in [-1, 1] (LightningDiT's) | imagenet.
  # Resample DINOv2's position embeddings with antialias (timm's, so LightningDiT's), whatever the
  # converted file says (transformers' Dinov2Model: without).
  config.loss.vf_pos_antialias = True
  # EQ-VAE's equivariance regulariser (zelaki/eqvae; configs/eq_vae_ft.py): with probability
  # equivariance_prob a step reconstructs tau(x) from tau(z) (tau: a down-scaling from
  # equivariance_scales, then quarter turns from equivariance_rotations), else with
  # equivariance_low_res_prob a down-scaled image, else x. The weight multiplies the reconstruction
  # term in tau steps (1 = EQ-VAE); 0 = off. Each scale is a compiled branch of the step (two each).
  config.loss.equivariance_weight = 0.0
  config.loss.equivariance_prob = 0.5
  config.loss.equivariance_low_res_prob = 0.25
  # Each x the latent side must be whole (EQ-VAE's code draws k/32, k = 8..31; its README: these).
  config.loss.equivariance_scales = (0.25, 0.5, 0.75)
  config.loss.equivariance_rotations = (1, 2, 3)  # Quarter turns.

  # -- Optimizer (LDM: Adam b=(0.5, 0.9), lr = 4.5e-6 x global batch, no schedule) -----
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # adam | adamw.
  config.optimizer.learning_rate = 4.5e-6 * 64
  config.optimizer.b1 = 0.5
  config.optimizer.b2 = 0.9
  config.optimizer.weight_decay = 0.0  # adamw only.
  config.optimizer.schedule = "constant"  # constant | cosine (after warm-up).
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0  # Global-norm clipping; 0 = off.
  # Non-finite steps are skipped; this many in a row (seen at a log step) roll the run back (guard)
  # or, with the guard off, stop it (exit 3).
  config.optimizer.max_consecutive_nonfinite = 10
  # Micro-batches per step (vae_scale/training/accumulate.py): the global batch stays the same on fewer chips.
  config.optimizer.grad_accum_steps = 1
  config.ema_decay = 0.9999  # EMA of the autoencoder parameters; 0 = off.
  # Start a fresh run from existing weights: a diffusers AutoencoderKL folder, an SD/LDM VAE
  # .safetensors, a params dir from `python -m vae_scale.convert import`, or another run's workdir.
  config.init_from = ""
  config.freeze_encoder = False  # Train the decoder only (SD's ft-EMA / ft-MSE recipe).

  # -- Data --------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  config.data.source = "folder"  # folder | tfds | synthetic | samples.
  config.data.path = ""  # folder: a directory, a glob, or a manifest file (.txt, one path per line).
  config.data.eval_path = ""  # folder: held-out images; empty = hold out eval_fraction of path.
  config.data.eval_fraction = 0.01
  config.data.tfds_name = ""  # tfds: dataset name, e.g. "imagenet2012".
  config.data.tfds_data_dir = ""  # tfds: data_dir ('' = TFDS default).
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_key = "image"  # tfds: feature holding the image.
  config.data.synthetic_size = 10_000  # synthetic / samples: examples per epoch.
  config.data.num_workers = 8  # Grain worker processes per host; 0 = in-process.
  config.data.prefetch_batches = 4
  config.data.max_pixels = 178_956_970  # Larger images are skipped (decompression-bomb guard).
  # Decode large JPEGs at a reduced scale (still >= the crop): several times faster on big photos.
  config.data.reduced_jpeg_decode = True

  # -- Run -----------------------------------------------------------------------
  config.global_batch_size = 64  # Across all devices and hosts.
  config.num_train_steps = 1_000_000
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.num_eval_images = 512  # Held-out images per evaluation.
  # pytorch-fid's Inception (safetensors, `python -m vae_scale.convert inception`): when set, every
  # evaluation also reports rFID (an Inception pass per image and reconstruction: not free).
  config.inception_weights = ""
  config.image_every_steps = 5_000  # Reconstruction grids (TensorBoard + PNG).
  config.checkpoint_every_steps = 5_000
  config.max_checkpoints_to_keep = 3  # The latest ones; the newest healthy one is never deleted.
  config.checkpoint = ml_collections.ConfigDict()
  # Also keep the best checkpoint by this held-out metric ('' = off; eval/psnr, eval/ssim,
  # eval/lpips, eval/rfid or eval/l1): every evaluation step then saves a checkpoint too.
  # `evaluate --step=best` and `convert export --step=best` read it.
  config.checkpoint.keep_best = ""

  # -- Guard against divergence (vae_scale/run/guard.py) --------------------------------------
  # At log steps: a non-finite streak (optimizer.max_consecutive_nonfinite), a loss spike, or a
  # collapsed discriminator rolls the run back to the newest healthy checkpoint before it and skips
  # the data window [that checkpoint, the spike + skip_extra] (PaLM's remedy).
  config.guard = ml_collections.ConfigDict()
  config.guard.enabled = True
  config.guard.spike_factor = 4.0  # A log window's rec_loss above this x the running median.
  config.guard.window = 20  # Log windows in the running median.
  config.guard.warmup_steps = 2_000  # No spike detection before (the loss falls fast early on).
  config.guard.collapse_windows = 5  # Log windows in a row with D's hinge loss pinned at 0; 0 = off.
  config.guard.collapse_tolerance = 0.01
  config.guard.max_rollbacks = 3  # Per run; one more trigger then stops with exit 3.
  config.guard.skip_extra = 0  # Steps' worth of batches skipped past the spike too.
  config.guard.lr_factor = 1.0  # After a rollback, the learning rate x this for lr_steps steps.
  config.guard.lr_steps = 0
  config.profile_steps = 0  # >0: capture a profile of this many steps after the first log.
  return config
