r"""A small KL-f4-shaped autoencoder that trains to a recognisable first run on 2 CPU cores.

64x64 crops of scikit-image's bundled photographs (no download) -> 16x16x4 latents; held-out
evaluation on crops of three other photographs (rocket, motorcycle, cameraman). About 7.5 minutes
on a 2-core machine to 22.6 dB held-out PSNR; at the end it prints the evaluation history and the
path of the last grid.

  python -m vae_scale.main --config=configs/demo.py --workdir=/tmp/vae_demo

Why f4 (three levels) and not KL-f8 (four): at 64x64 an f8 latent is 8x8x4 (48x fewer numbers
than the image) and, in the same minutes, stayed near 18 dB; 16 latent channels at f8 did not help
(17.5 dB after 500 steps), while f4 reached 20.7 dB after 500 steps and 22.6 dB after 1,200.
BENCHMARKS.md ("The demo") has the runs. The full-size recipe is configs/ldm_f8.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldm_f8  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  """Returns the demo config: ldm_f8's loss with a tiny f4 model, CPU-sized batch, no discriminator."""
  config = ldm_f8.get_config()
  config.image_size = 64
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)  # Two downsamplings: f = 4.
  config.model.num_res_blocks = 1
  config.model.norm_groups = 8
  config.disc.enabled = False
  config.loss.kl_weight = 1e-6
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"  # Settles by the end of the short run.
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.warmup_steps = 50
  config.optimizer.grad_clip_norm = 1.0
  config.ema_decay = 0.99  # Evaluation uses the EMA weights.
  config.data.source = "samples"
  config.data.num_workers = 0
  config.data.prefetch_batches = 2
  config.global_batch_size = 8
  config.num_train_steps = 1_200
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.num_eval_images = 96  # 32 crops of each held-out photograph.
  config.image_every_steps = 300
  config.checkpoint_every_steps = 300
  return config
