"""Metrics: clu.metrics collections returned by the steps, and latent statistics on the host."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from clu import metrics as clu_metrics


def collection(names: Sequence[str]) -> type[clu_metrics.Collection]:
  """A Collection class averaging each named scalar over the steps since the last write.

  Create it once per run and hand it to the steps, so every step returns the same pytree type.
  """
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in sorted(names)})


@dataclasses.dataclass
class Moments:
  """Count, mean and sum of squared deviations per channel, combined exactly (Chan et al.).

  Float64 on the host, so millions of latents don't lose precision.
  """

  n: float
  mean: np.ndarray  # [C]
  m2: np.ndarray  # [C]

  @classmethod
  def empty(cls, channels: int) -> "Moments":
    return cls(0.0, np.zeros(channels), np.zeros(channels))

  @classmethod
  def of(cls, latents: np.ndarray) -> "Moments":
    """Moments of latents [..., C] over every axis but the last."""
    x = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[-1])
    return cls(float(len(x)), mean, ((x - mean) ** 2).sum(axis=0))

  def merge(self, other: "Moments") -> "Moments":
    n = self.n + other.n
    if n == 0:
      return self
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.n / n)
    m2 = self.m2 + other.m2 + delta ** 2 * (self.n * other.n / n)
    return Moments(n, mean, m2)

  def channel_std(self) -> np.ndarray:
    return np.sqrt(self.m2 / max(self.n, 1.0))

  def overall(self) -> tuple[float, float]:
    """(mean, std) over all channels together."""
    total = Moments(0.0, np.zeros(1), np.zeros(1))
    for c in range(len(self.mean)):
      total = total.merge(Moments(self.n, self.mean[c:c + 1], self.m2[c:c + 1]))
    return float(total.mean[0]), float(np.sqrt(total.m2[0] / max(total.n, 1.0)))


def latent_summary(moments: Moments) -> dict[str, Any]:
  """The latent statistics as JSON values, with LDM's scale factor 1/std and the shift (mean)."""
  mean, std = moments.overall()
  return {"latent_mean": mean, "latent_std": std,
          "latent_mean_per_channel": [float(v) for v in moments.mean],
          "latent_std_per_channel": [float(v) for v in moments.channel_std()],
          "scale_factor": 1.0 / std if std > 0 else None, "shift_factor": mean}
