"""skipping: unreadable files are replaced by substitutes and counted into the batches;
nearly-all-bad data stops the run with a clear error."""

import os
import pickle

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
from vae_scale.data import sampler
from vae_scale.data import skipping
from vae_scale.errors import DataError


def _expected_skipped(files, bad_names, seed, num_examples):
  """Unreadable files the first `num_examples` global examples pass over: at each g, the elements
  at g, g + n, g + 2n, ... until a readable one (`sampler.alternate`)."""
  order, n, skipped = sampler.global_order(len(files), seed), len(files), 0
  for g in range(num_examples):
    k = 0
    while os.path.basename(files[order[sampler.alternate(g, k, n)]]) in bad_names:
      k += 1
    skipped += k
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
  assert 8 <= got <= 30  # 7 of 22 files are bad: about a third of 36 reads, give or take.


def test_a_folder_of_non_images_stops_with_a_clear_error(tmp_path):
  write_files(tmp_path, {f"{i}_{k}": v for k, v in bad_image_files().items() for i in range(2)})
  write_files(tmp_path, {"rgb.jpg": encode_image(random_photo(), "JPEG")})  # 1 of 15 is good.
  config = folder_config(tmp_path)
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  with pytest.raises(DataError, match=r"Stopping: \d+ of the 1\d\d files tried "
                     r"could not be used.*First failures: .*(truncated|corrupt|empty|text)"):
    take(it, 30)


def test_skip_policy_stops_on_a_long_run_of_failures():
  bad_files = skipping.BadFiles(skipping.SkipPolicy(min_attempts=1000, max_consecutive_bad=20))
  for _ in range(50):
    bad_files.good()
  for i in range(19):
    bad_files.failed(f"f{i}: gone", tries_for_example=1)
  with pytest.raises(DataError, match="last 20 files tried in a row.*f0: gone"):
    bad_files.failed("f19: gone", tries_for_example=1)


def test_one_example_whose_substitutes_all_fail_stops_even_between_good_reads():
  # Other threads' good reads reset the run of failures; one example's own tries still count.
  bad_files = skipping.BadFiles(skipping.SkipPolicy(min_attempts=1000, max_consecutive_bad=5))
  for k in range(1, 5):
    bad_files.failed(f"f{k}: gone", tries_for_example=k)
    bad_files.good()
  with pytest.raises(DataError, match="last 5 files tried in a row"):
    bad_files.failed("f5: gone", tries_for_example=5)


def test_bad_file_counts_pickle_into_worker_processes_with_a_lock_of_their_own():
  bad_files = skipping.BadFiles()
  bad_files.failed("a: gone", tries_for_example=1)
  copy = pickle.loads(pickle.dumps(bad_files))  # As Grain sends the map to each worker.
  assert (copy.tried, copy.bad) == (1, 1)
  copy.good()
  assert copy.in_a_row == 0 and bad_files.in_a_row == 1
