"""rFID: Fréchet distance between feature sets, on the host in float64, as pytorch-fid computes it.

Features are streamed into a `FeatureStats` (count, sum, sum of outer products, all float64), which
merges across batches and hosts; its mean and covariance (np.cov's ddof=1) then go into
`frechet_distance`, a copy of `pytorch_fid.fid_score.calculate_frechet_distance`:

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

In an evaluation (`RFID`), every process adds the pool3 features of its own weight-1 images
(padding never enters) to two `FeatureStats` (held-out images and their reconstructions); after the
last batch the per-host sums are gathered (`allgather_stats`: bit-exact, float64 travels as uint32
pairs, since JAX without x64 would round it to float32) and merged, and every process computes the
same `fid_from_stats` in float64.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from scipy import linalg

from vae_scale.models import inception


@dataclasses.dataclass
class FeatureStats:
  """Running mean / covariance of feature vectors, in float64.

  The sums are exact enough for FID-sized sets (tens of thousands of 2048-d vectors): covariance is
  formed once at the end as (S2 - n mu mu^T) / (n - 1), every term in float64.

  Attributes:
    dim: feature dimension D.
    count: number of vectors added.
    total: [D] sum of the vectors.
    outer: [D, D] sum of their outer products.
  """

  dim: int
  count: int = 0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros((self.dim,), np.float64)
    if self.outer is None:
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def add(self, features: np.ndarray) -> "FeatureStats":
    """Adds a batch of feature vectors.

    Args:
      features: [N, D], any float dtype (e.g. Inception pool3 [N, 2048] float32).

    Returns:
      self, for chaining.
    """
    f = np.asarray(features, np.float64).reshape(-1, self.dim)
    self.count += f.shape[0]
    self.total += f.sum(axis=0)
    self.outer += f.T @ f
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """The statistics of both sets together (as if every vector went into one)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge {other.dim}-d feature statistics into {self.dim}-d ones")
    return FeatureStats(self.dim, self.count + other.count, self.total + other.total,
                        self.outer + other.outer)

  def mean(self) -> np.ndarray:
    """[D] float64 mean of the features."""
    if self.count < 1:
      raise ValueError("no features were added")
    return self.total / self.count

  def cov(self) -> np.ndarray:
    """[D, D] float64 sample covariance (ddof=1, as np.cov(features, rowvar=False))."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    mu = self.mean()
    c = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return (c + c.T) / 2  # Exactly symmetric, as np.cov's result is.

  def state(self) -> dict[str, np.ndarray]:
    """The raw sums (count, total, outer) as arrays, e.g. to gather across hosts and re-merge."""
    return {"count": np.asarray(self.count, np.int64), "total": self.total, "outer": self.outer}

  @classmethod
  def from_state(cls, state: dict[str, np.ndarray]) -> "FeatureStats":
    total = np.asarray(state["total"], np.float64)
    return cls(total.shape[0], int(state["count"]), total.copy(),
               np.asarray(state["outer"], np.float64).copy())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

  sqrtm(sigma1 sigma2) by scipy.linalg.sqrtm; when that is not finite (a singular product), it is
  recomputed with eps added to both diagonals; a complex result with a diagonal imaginary part above
  1e-3 is an error, otherwise its real part is used.

  Args:
    mu1: [D] mean of the first set (e.g. held-out images' features).
    sigma1: [D, D] its covariance.
    mu2: [D] mean of the second set (e.g. their reconstructions' features).
    sigma2: [D, D] its covariance.
    eps: diagonal offset for a singular product.

  Returns:
    The distance (float64 arithmetic), >= 0 up to rounding.

  Raises:
    ValueError: shapes differ, or sqrtm has a large imaginary component.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"mean shapes {mu1.shape} vs {mu2.shape}, covariance shapes {sigma1.shape} "
                     f"vs {sigma2.shape} differ")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("fid calculation produces singular product; adding %s to diagonal of cov "
                    "estimates", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):  # Rounding can leave a small imaginary part.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 "
                       "sigma2): the covariances are too ill-conditioned (use more images)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
  # scipy >= 1.16 deprecates `disp=False` (pytorch-fid passes it); the result is the same matrix.
  # Singular products are handled by the caller, so scipy's warning about them is noise.
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    out = linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def fid_from_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
  """`frechet_distance` between two feature sets' statistics."""
  return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov(), eps)


# --------------------------------------------------------------------------- across hosts


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


def allgather_stats(stats: FeatureStats) -> FeatureStats:
  """The merge of every process's `stats` (each process calls it; all get the same result).

  The float64 sums travel bit-exactly as uint32 words. Works with one process too.
  """
  words = {"count": _to_words(np.asarray([stats.count], np.float64)),
           "total": _to_words(stats.total), "outer": _to_words(stats.outer)}
  gathered = multihost_utils.process_allgather(words)  # Each [num_processes, ...].
  merged = FeatureStats(stats.dim)
  for p in range(np.asarray(gathered["count"]).shape[0]):
    back = {k: np.ascontiguousarray(np.asarray(v[p], np.uint32)).view(np.float64)
            for k, v in gathered.items()}
    merged = merged.merge(FeatureStats(stats.dim, int(back["count"][0]), back["total"],
                                           back["outer"].reshape(stats.dim, stats.dim)))
  return merged


class RFID:
  """Accumulates the features of held-out images and of their reconstructions; then rFID."""

  def __init__(self, dim: int = inception.FEATURE_DIM):
    self.real, self.fake = FeatureStats(dim), FeatureStats(dim)

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
    return fid_from_stats(real, fake), real.count
