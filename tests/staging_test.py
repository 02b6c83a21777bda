"""Staged units: committed by their .json, streamed in and out, nothing left by a failure."""

import os

import pytest

from vae_scale.data import packing
from vae_scale.data import staging
from vae_scale.errors import DataError


def _records(n, fail_at=None):
  for i in range(n):
    if i == fail_at:
      raise DataError("t.tar: truncated")
    yield packing.Record((3, i), f"k{i}", f"/x/{i}", "", image=bytes([i]) * (i + 1),
                         height=i, width=2 * i, caption="é" if i == 1 else "",
                         reason="corrupt" if i == 2 else "")


def test_a_unit_round_trips_and_counts_as_committed(tmp_path):
  folder = staging.open_job(str(tmp_path / "w"), "job1", {"src": "/x"})
  staging.write_unit(folder, 3, _records(4))
  assert staging.committed(folder) == {3}
  assert list(staging.read_unit(folder, 3)) == list(_records(4))
  assert [r.image for r in staging.read_fields(folder, 3)] == [b""] * 4


def test_a_failure_mid_unit_leaves_nothing_and_another_job_clears_the_folder(tmp_path):
  folder = staging.open_job(str(tmp_path / "w"), "job1", {})
  with pytest.raises(DataError):
    staging.write_unit(folder, 0, _records(4, fail_at=3))
  assert staging.committed(folder) == set() and os.listdir(folder / "units") == []
  staging.write_unit(folder, 1, _records(2))
  assert staging.committed(staging.open_job(str(tmp_path / "w"), "job1", {})) == {1}
  assert staging.committed(staging.open_job(str(tmp_path / "w"), "job2", {})) == set()
