r"""KL-f8 (configs/ldm_f8.py) sized for common TPU slices and GPU hosts.

The variant is the text after ':' in --config (ml_collections passes it to get_config):

  python -m vae_scale.main --config=configs/pods.py:v5e-64 --workdir=gs://BUCKET/run1 \
      --config.data.path=gs://BUCKET/images

Training is data parallel over one mesh axis, `data`, that spans every device, so a variant
only has to size the global batch to the device count (global_batch_size must split evenly)
and scale the learning rates with it the way LDM does (4.5e-6 x global batch). On several
slices (Multislice, `launch/gcp.sh --num-slices=N`) the axis still spans every device; the mesh
orders it slice by slice (vae_scale/training/sharding.py), so gradients are reduced over each slice's
ICI first and only then across slices over the data-center network.

Device counts are what JAX reports (jax.device_count()), which is not always the number in the
accelerator name: v4 and v5p names count TensorCores, two per chip, and JAX shows one device per
chip (megacore); v5e names count chips, one TensorCore each.

  variant  accelerator       chips  hosts  JAX devices  per-device  global batch
  v5e-8    v5litepod-8         8      1        8            4           32
  v5e-64   v5litepod-64       64      8       64            4          256
  v4-32    v4-32              16      4       16            8          128
  v5p-128  v5p-128            64     16       64            8          512
  2xv5e-256 v5litepod-256 x2 512     64      512            4         2048
  gpu8     8 GPUs, 1 host      -      1        8            8           64
  gpu8x4   8 GPUs x 4 hosts    -      4       32            8          256

2xv5e-256 is two v5litepod-256 slices joined over DCN (launch/gcp.sh --num-slices=2). Its
hosts follow the v5e table (a 16x16 slice = 32 hosts); if the VMs carry 4 chips each (64 per
slice) the global batch still divides evenly between them.

Per-device batches are starting points that fit 256x256 crops in bfloat16 with room to spare
(v5e has 16 GiB of HBM per chip, v4 32 GiB, v5p 95 GiB, GPUs assumed 40-80 GiB); raise them
with --config.global_batch_size, keeping it a multiple of the device count.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import ldm_f8  # pylint: disable=g-import-not-at-top,wrong-import-position

# LDM's rule: learning rate = base rate x global batch, for the autoencoder and the discriminator
# alike (configs/ldm_f8.py: 4.5e-6 x 64 = 2.88e-4 for both).
BASE_LEARNING_RATE = 4.5e-6


@dataclasses.dataclass(frozen=True)
class Slice:
  """How many devices JAX sees on a slice, and what each of them should carry."""
  num_devices: int  # jax.device_count() on the whole slice or cluster.
  num_processes: int  # JAX processes: one per TPU host; one per GPU under SLURM.
  per_device_batch: int
  remat: str  # model.remat: none | block | level.
  num_workers: int  # Grain worker processes per JAX process.
  num_slices: int = 1  # TPU slices joined over DCN (Multislice); devices and hosts are totals.


SLICES = {
    # One v5e host (8 chips, 16 GiB HBM each): a cheap place to rehearse a pod run.
    "v5e-8": Slice(num_devices=8, num_processes=1, per_device_batch=4, remat="block",
                   num_workers=16),
    # v5litepod-64: 8 hosts x 8 chips. 16 GiB per chip, so rematerialize per block.
    "v5e-64": Slice(num_devices=64, num_processes=8, per_device_batch=4, remat="block",
                    num_workers=16),
    # v4-32 = 32 TensorCores = 16 chips on 4 hosts; megacore makes each chip one JAX device.
    "v4-32": Slice(num_devices=16, num_processes=4, per_device_batch=8, remat="none",
                   num_workers=16),
    # v5p-128 = 128 TensorCores = 64 chips on 16 hosts (megacore: 64 JAX devices).
    "v5p-128": Slice(num_devices=64, num_processes=16, per_device_batch=8, remat="none",
                     num_workers=16),
    # Two v5litepod-256 slices (Multislice, launch/gcp.sh --num-slices=2): 512 chips over DCN.
    # 16 GiB per chip, as on v5e-64. Resuming on one slice (or on another shape) keeps this
    # global batch if the device count divides it: pass --config.global_batch_size to change it.
    "2xv5e-256": Slice(num_devices=512, num_processes=64, per_device_batch=4, remat="block",
                       num_workers=16, num_slices=2),
    # One host with 8 GPUs, one process (launch/gpu_host.sh).
    "gpu8": Slice(num_devices=8, num_processes=1, per_device_batch=8, remat="none",
                  num_workers=32),
    # Four 8-GPU hosts under SLURM, one process per GPU (launch/slurm.sbatch): the Grain
    # workers of 8 processes share each host's CPUs.
    "gpu8x4": Slice(num_devices=32, num_processes=32, per_device_batch=8, remat="none",
                    num_workers=4),
}


def get_config(arg: str | None = None):
  """Returns ldm_f8 with the global batch, learning rate and input workers of a slice.

  Args:
    arg: a key of SLICES, e.g. "v5e-64" (from --config=configs/pods.py:v5e-64).

  Raises:
    ValueError: arg is missing or not a known variant; the message lists the known ones.
  """
  if arg not in SLICES:
    raise ValueError(f"configs/pods.py: unknown variant {arg!r}; use "
                     f"--config=configs/pods.py:VARIANT with VARIANT one of {', '.join(SLICES)}")
  s = SLICES[arg]
  config = ldm_f8.get_config()
  config.global_batch_size = s.per_device_batch * s.num_devices
  config.optimizer.learning_rate = BASE_LEARNING_RATE * config.global_batch_size
  config.disc.learning_rate = BASE_LEARNING_RATE * config.global_batch_size
  # bfloat16 activations on TPUs and on A100/H100-class GPUs; parameters, norms and the
  # loss stay float32 (see model.dtype in configs/ldm_f8.py).
  config.model.dtype = "bfloat16"
  config.model.remat = s.remat
  config.data.num_workers = s.num_workers
  return config
