"""Fréchet distance between feature sets (rFID), on the host in float64, as pytorch-fid computes it.

Features are streamed into a `FeatureStats` (count, sum, sum of outer products, all float64), which
merges across batches and hosts; its mean and covariance (np.cov's ddof=1) then go into
`frechet_distance`, a copy of `pytorch_fid.fid_score.calculate_frechet_distance`:

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from absl import logging
from scipy import linalg


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
