"""Feature statistics and the Fréchet distance against numpy and pytorch-fid."""

import logging

import jax
import numpy as np
import pytest
from pytorch_fid import fid_score

from vae_scale.eval import fid
from vae_scale.training import sharding


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
  """ReLU-like features with correlated dimensions, [n, d] float32."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(0, 1, (d, d)) / np.sqrt(d)
  return np.maximum(rng.normal(shift, 1, (n, d)) @ mix + 0.5, 0).astype(np.float32)


def test_stats_match_numpy():
  f = _features(0, 203, 32)
  stats = fid.FeatureStats(32)
  for batch in np.array_split(f, [7, 8, 100]):  # Uneven batches, one of a single vector.
    stats.add(batch)
  assert stats.count == 203
  np.testing.assert_allclose(stats.mean(), np.mean(f.astype(np.float64), axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov(), np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10,
                             atol=1e-13)
  assert stats.mean().dtype == np.float64 and np.array_equal(stats.cov(), stats.cov().T)


def test_merge_equals_one_pass_and_state_round_trips():
  f = _features(1, 120, 16)
  whole = fid.FeatureStats(16).add(f)
  a, b = fid.FeatureStats(16).add(f[:50]), fid.FeatureStats(16).add(f[50:])
  merged = fid.FeatureStats.from_state(a.state()).merge(fid.FeatureStats.from_state(b.state()))
  assert merged.count == whole.count
  np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13)
  np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-11, atol=1e-14)
  with pytest.raises(ValueError):
    fid.FeatureStats(16).merge(fid.FeatureStats(8))
  with pytest.raises(ValueError):
    fid.FeatureStats(16).add(f[:1]).cov()


def _reference(f1, f2):
  mu1, s1 = np.mean(f1, axis=0), np.cov(f1, rowvar=False)
  mu2, s2 = np.mean(f2, axis=0), np.cov(f2, rowvar=False)
  return (mu1, s1, mu2, s2), float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))


@pytest.mark.parametrize("n,d,shift", [(300, 64, 0.3), (300, 64, 0.0), (20, 64, 0.5)],
                         ids=["full_rank", "same_distribution", "rank_deficient"])
def test_frechet_distance_matches_pytorch_fid(n, d, shift):
  f1, f2 = _features(2, n, d).astype(np.float64), _features(3, n, d, shift).astype(np.float64)
  args, ref = _reference(f1, f2)
  out = fid.frechet_distance(*args)
  assert ref > 0
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  s1, s2 = fid.FeatureStats(d).add(f1), fid.FeatureStats(d).add(f2)
  np.testing.assert_allclose(fid.fid_from_stats(s1, s2), ref, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # pytorch-fid's sqrtm call.
def test_singular_product_takes_the_eps_offset(capsys, caplog):
  # Two 3-d feature sets of 2 vectors each: sqrtm(sigma1 sigma2) is not finite, so both add eps*I.
  f1 = np.array([[2.0, 2.0, 1.0], [0.0, 1.0, 1.0]])
  f2 = np.array([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
  args, ref = _reference(f1, f2)
  assert "adding 1e-06 to diagonal" in capsys.readouterr().out  # pytorch-fid took that path.
  with caplog.at_level(logging.WARNING):
    out = fid.frechet_distance(*args)
  assert "singular product" in caplog.text
  assert np.isfinite(out)
  np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_one_dimensional_closed_form():
  # d^2 = (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2).
  out = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
  assert out == pytest.approx(4.0 + 4.0 + 9.0 - 2 * 6.0, rel=1e-12)
  assert fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(
      0.0, abs=1e-12)


def test_large_imaginary_component_is_an_error():
  sigma = np.diag([-1.0, 1.0])  # Not a covariance: sqrtm has an imaginary diagonal.
  with pytest.raises(ValueError, match="Imaginary component"):
    fid_score.calculate_frechet_distance(np.zeros(2), sigma, np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="Imaginary component"):
    fid.frechet_distance(np.zeros(2), sigma, np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------- across hosts


def test_allgather_stats_is_bit_exact():
  rng = np.random.default_rng(0)
  stats = fid.FeatureStats(6).add(rng.normal(size=(9, 6)) * 1e3 + 1e-9)
  out = fid.allgather_stats(stats)  # One process: the gather of itself.
  assert out.count == 9
  np.testing.assert_array_equal(out.total, stats.total)
  np.testing.assert_array_equal(out.outer, stats.outer)


def test_local_rows_are_this_process_rows_in_order():
  mesh = sharding.create_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  arr = jax.device_put(x, sharding.batch_sharding(mesh))
  assert len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(fid.local_rows(arr), x)


def test_padding_is_left_out_of_the_statistics():
  acc = fid.RFID(dim=3)
  real = np.arange(12, dtype=np.float64).reshape(4, 3)
  acc.add(real, real + 1, np.array([1, 0, 1, 0], np.float32))
  assert acc.real.count == acc.fake.count == 2
  np.testing.assert_array_equal(acc.real.total, real[[0, 2]].sum(0))
