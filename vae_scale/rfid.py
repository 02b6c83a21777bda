"""rFID's host side in an evaluation: per-host Inception feature statistics, gathered across hosts.

Every process adds the pool3 features of its own weight-1 images (padding never enters) to two
`fid.FeatureStats` (held-out images and their reconstructions, float64 on the host); after the
last batch the per-host sums are gathered (`process_allgather`, bit-exact: float64 travels as
uint32 pairs, since JAX without x64 would round it to float32) and merged, and every process
computes the same `fid.fid_from_stats` in float64. Also the evaluation's progress line (ETA) and
the LDM Table 8 summary line.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vae_scale import fid
from vae_scale.models import inception

FULL_RANK_IMAGES = inception.FEATURE_DIM  # Fewer images leave the 2048-d covariance singular.


def local_rows(array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process holds, in global order.

  Args:
    array: [B, ...] sharded on its leading axis (replicas of a row are read once).

  Returns:
    [b, ...] numpy, this process's rows (all B with one process).
  """
  shards = {}
  for shard in array.addressable_shards:
    start = (shard.index[0].start or 0) if shard.index else 0
    shards.setdefault(start, shard)
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=0)


def _to_words(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float64)).view(np.uint32)


def allgather_stats(stats: fid.FeatureStats) -> fid.FeatureStats:
  """The merge of every process's `stats` (each process calls it; all get the same result).

  The float64 sums travel bit-exactly as uint32 words. Works with one process too.
  """
  words = {"count": _to_words(np.asarray([stats.count], np.float64)),
           "total": _to_words(stats.total), "outer": _to_words(stats.outer)}
  gathered = multihost_utils.process_allgather(words)  # Each [num_processes, ...].
  merged = fid.FeatureStats(stats.dim)
  for p in range(np.asarray(gathered["count"]).shape[0]):
    back = {k: np.ascontiguousarray(np.asarray(v[p], np.uint32)).view(np.float64)
            for k, v in gathered.items()}
    merged = merged.merge(fid.FeatureStats(stats.dim, int(back["count"][0]), back["total"],
                                           back["outer"].reshape(stats.dim, stats.dim)))
  return merged


class RFID:
  """Accumulates the features of held-out images and of their reconstructions; then rFID."""

  def __init__(self, dim: int = inception.FEATURE_DIM):
    self.real, self.fake = fid.FeatureStats(dim), fid.FeatureStats(dim)

  def add(self, real: np.ndarray, fake: np.ndarray, weight: np.ndarray) -> None:
    """Adds this process's rows whose weight is 1.

    Args:
      real: [b, D] features of the held-out images.
      fake: [b, D] features of their reconstructions (clipped to [-1, 1]).
      weight: [b] in {0, 1}; 0 marks padding, which is left out.
    """
    keep = np.asarray(weight) > 0.5
    self.real.add(np.asarray(real)[keep])
    self.fake.add(np.asarray(fake)[keep])

  def compute(self, process_count: int) -> tuple[float | None, int]:
    """(rFID over every process's images, the number of images), the same on every process;
    rFID is None (with a warning) below 2 images, which have no covariance."""
    real, fake = self.real, self.fake
    if process_count > 1:
      real, fake = allgather_stats(real), allgather_stats(fake)
    if real.count < 2:
      logging.warning("rFID needs at least 2 images, got %d: not reported", real.count)
      return None, real.count
    if real.count < FULL_RANK_IMAGES:
      logging.warning("rFID over %d images: with fewer than %d the feature covariances are "
                      "singular and rFID is biased upwards; compare only runs scored on the same "
                      "number of images (LDM used 50k, SD's VAE cards 5k)", real.count,
                      FULL_RANK_IMAGES)
    return fid.fid_from_stats(real, fake), real.count


class Progress:
  """Logs `done/total batches, images/s, ETA` every `every` batches (0: never)."""

  def __init__(self, total_batches: int, every: int, what: str = "Evaluation"):
    self.total, self.every, self.what = total_batches, every, what
    self.start, self.images = time.perf_counter(), 0.0

  def update(self, batches_done: int, images: float) -> None:
    """Called after each batch with the batches done so far and that batch's (global) images."""
    self.images += images
    if not self.every or (batches_done % self.every and batches_done != self.total):
      return
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    eta = elapsed / batches_done * (self.total - batches_done)
    logging.info("%s: %d/%d batches, %d images, %.1f images/s, ETA %s", self.what, batches_done,
                 self.total, int(self.images), self.images / elapsed, _duration(eta))


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def table_line(result: dict) -> str:
  """One line in LDM Table 8's columns (rFID, PSNR, SSIM), then LPIPS, for a result of
  `evaluation.Evaluator` (absent metrics show as '-')."""
  rfid = f"{result['rfid']:.3f}" if result.get("rfid") is not None else "-"
  lp = (f"{result['lpips']:.4f} ± {result['lpips_std']:.4f}" if result.get("lpips") is not None
        else "-")
  return (f"rFID {rfid} | PSNR {result['psnr']:.2f} ± {result['psnr_std']:.2f} | SSIM "
          f"{result['ssim']:.3f} ± {result['ssim_std']:.3f} | LPIPS {lp} | "
          f"{result['num_images']} images")
