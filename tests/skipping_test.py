"""skipping: unreadable files are skipped and counted into the batches; nearly-all-bad data stops
the run with a clear error."""

import os

import grain
import numpy as np
import pytest

from conftest import bad_image_files
from conftest import encode_image
from conftest import folder_config
from conftest import good_image_files
from conftest import random_photo
from conftest import take
from conftest import write_files
from vae_scale.data import file_lists
from vae_scale.data import pipeline
from vae_scale.data import skipping
from vae_scale.data import sources
from vae_scale.errors import DataError


def _expected_skipped(files, bad_names, seed, num_good):
  """Bad files the shuffled stream passes before its `num_good`-th good one (Grain's order)."""
  order = grain.MapDataset.source(sources.FolderSource(files, "x")).seed(seed)
  order = order.shuffle().repeat()
  skipped, good, i = 0, 0, 0
  while good < num_good:
    if os.path.basename(order[i]) in bad_names:
      skipped += 1
    else:
      good += 1
    i += 1
  return skipped


# With a worker, the batches come from a Grain worker process.
@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_train_batches_hold_good_images_and_count_the_skipped(tmp_path, num_workers):
  good, bad = good_image_files(), bad_image_files()
  write_files(tmp_path, {**good, **bad})
  config = folder_config(tmp_path, **{"data.num_workers": num_workers})
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  batches = take(it, 9)  # 36 good images: a little over two and a half epochs.
  assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
  assert all(np.isfinite(b["image"]).all() for b in batches)
  got = sum(int(b["skipped"].sum()) for b in batches)
  files = file_lists.list_image_files(str(tmp_path))
  assert got == _expected_skipped(files, set(bad), config.seed, 36)
  assert 2 * len(bad) <= got <= 3 * len(bad)


def test_a_folder_of_non_images_stops_with_a_clear_error(tmp_path):
  write_files(tmp_path, {f"{i}_{k}": v for k, v in bad_image_files().items() for i in range(2)})
  write_files(tmp_path, {"rgb.jpg": encode_image(random_photo(), "JPEG")})  # 1 of 15 is good.
  config = folder_config(tmp_path)
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  with pytest.raises(DataError, match=r"Stopping: \d+ of the 1\d\d files tried "
                     r"could not be used.*First failures: .*(truncated|corrupt|empty|text)"):
    take(it, 30)


def test_skip_policy_stops_on_a_long_run_of_failures():
  records = [{"image": np.zeros(1)}] * 50 + [{"error": f"f{i}: gone"} for i in range(30)]
  ds = grain.MapDataset.source(records).to_iter_dataset()
  policy = skipping.SkipPolicy(min_attempts=1000, max_consecutive_bad=20)
  it = iter(skipping.SkipBad(ds, policy))
  assert len(take(it, 50)) == 50
  with pytest.raises(DataError, match="last 20 files tried in a row.*f0: gone"):
    next(it)
