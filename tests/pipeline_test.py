"""pipeline: the train stream (determinism; global batches the same for any process count, resume
position and worker count; layout-independent bad-file substitutes) and the eval set (fixed center
crops, unreadable files dropped, weight-0 padding)."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import bad_image_files
from conftest import folder_config
from conftest import good_image_files
from conftest import take
from conftest import tiny_config
from conftest import write_files
from vae_scale.data import transforms
from vae_scale.data import file_lists
from vae_scale.data import pipeline
from vae_scale.data import sampler
from vae_scale.data import sources


class IndexSource:
  """Constant-colour images whose colour encodes the index (crop/flip leave it intact)."""

  def __init__(self, n, size):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __repr__(self):
    return f"IndexSource({self.n}, {self.size})"

  def __getitem__(self, i):
    img = np.zeros((self.size, self.size, 3), np.uint8)
    img[..., 0], img[..., 1] = i % 256, i // 256
    return img


def _indices(batch):
  u8 = np.rint((batch["image"][:, 0, 0, :2] + 1) * 127.5).astype(int)
  return list(u8[:, 0] + 256 * u8[:, 1])


# --------------------------------------------------------------------------- train


def test_train_stream_is_deterministic_for_a_seed():
  config = tiny_config()
  a = take(iter(pipeline.create_train_dataset(config, 0, 1)), 3)
  b = take(iter(pipeline.create_train_dataset(config, 0, 1)), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert a[0]["image"].shape == (8, 16, 16, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["image"].min() >= -1 and a[0]["image"].max() <= 1
  assert a[0]["skipped"].shape == (8,) and int(a[0]["skipped"].sum()) == 0
  config.seed = 1
  c = take(iter(pipeline.create_train_dataset(config, 0, 1)), 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_processes_read_disjoint_shares_covering_the_epoch():
  config = tiny_config(global_batch_size=8)
  src = IndexSource(64, 16)
  seen = []
  for pi in range(2):
    it = iter(pipeline.create_train_dataset(config, pi, 2, source=src))
    # 64 examples / 2 processes / 4 per process batch = 8 batches make one epoch per process.
    seen.append([i for b in take(it, 8) for i in _indices(b)])
  assert len(seen[0]) == len(set(seen[0])) == 32
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(64))


def _global_batches(config, process_count, num_batches, source=None, start=0):
  """Global batches assembled from `process_count` per-process streams, each process's rows where
  a mesh listing devices process by process puts them (rows [p*b, (p+1)*b))."""
  streams = [iter(pipeline.create_train_dataset(config, p, process_count, source=source,
                                                start=start)) for p in range(process_count)]
  out = []
  for _ in range(num_batches):
    parts = [next(it) for it in streams]
    out.append({k: np.concatenate([part[k] for part in parts]) for k in ("image", "skipped")})
  return out


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["skipped"], y["skipped"])


def test_global_batches_are_the_same_for_any_process_count_and_resume_position():
  config = tiny_config(global_batch_size=8)  # Synthetic images: exact pixels, crops included.
  one = _global_batches(config, 1, 10)  # 64 examples: an epoch is 8 global batches.
  for p in (2, 4):
    _assert_same_batches(_global_batches(config, p, 10), one)
  # A resume at step 3 on 4 processes continues with global batch 3 of the 1-process stream.
  _assert_same_batches(_global_batches(config, 4, 7, start=3 * 8), one[3:])
  # Every index of an epoch once, across the epoch's global batches.
  src = IndexSource(64, 16)
  seen = [i for b in _global_batches(config, 2, 8, source=src) for i in _indices(b)]
  assert sorted(seen) == list(range(64))


def test_a_changed_global_batch_continues_from_the_same_example():
  src = IndexSource(64, 16)
  flat = [i for b in _global_batches(tiny_config(global_batch_size=8), 1, 6, source=src)
          for i in _indices(b)]
  # Checkpoint after 3 steps of 8 examples, resumed with a global batch of 4 on 2 processes.
  after = [i for b in _global_batches(tiny_config(global_batch_size=4), 2, 6, source=src,
                                      start=24) for i in _indices(b)]
  assert after == flat[24:48]


def test_global_order_is_a_new_permutation_every_epoch():
  order = sampler.global_order(50, seed=0)
  epochs = [[order[e * 50 + i] for i in range(50)] for e in range(3)]
  assert all(sorted(e) == list(range(50)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  assert [sampler.global_order(50, seed=0)[i] for i in range(50)] == epochs[0]
  assert [sampler.global_order(50, seed=1)[i] for i in range(50)] != epochs[0]


def _expected_substitutes(files, bad_names, seed, first, count):
  """(source index read, skipped) of global examples first..first+count: each unreadable element
  at g replaced by the element at g + k*n, the first readable k."""
  order, n, out = sampler.global_order(len(files), seed), len(files), []
  for g in range(first, first + count):
    k = 0
    while os.path.basename(files[order[g + k * n]]) in bad_names:
      k += 1
    out.append((order[g + k * n], k))
  return out


def test_unreadable_files_get_the_same_substitutes_in_every_layout(tmp_path):
  good, bad = good_image_files(), bad_image_files()
  write_files(tmp_path, {**good, **bad})
  files = file_lists.list_image_files(str(tmp_path))
  source = sources.FolderSource(files, "x")
  config = folder_config(tmp_path, global_batch_size=4)
  one = _global_batches(config, 1, 8, source=source)  # 32 examples of 22 files: 1.5 epochs.
  for p in (2, 4):  # 4 processes: one example each.
    _assert_same_batches(_global_batches(config, p, 8, source=source), one)
  _assert_same_batches(_global_batches(config, 2, 3, source=source, start=5 * 4), one[5:])
  want = _expected_substitutes(files, set(bad), config.seed, 0, 32)
  got_skipped = [int(k) for b in one for k in b["skipped"]]
  assert got_skipped == [k for _, k in want]
  assert sum(got_skipped) >= 10  # 7 of 22 files are bad: about a third of the reads.
  # Each example is the substitute's own train view: its decode and crop from (seed, g, k).
  g = next(i for i, (_, k) in enumerate(want) if k)
  index, k = want[g]
  image = transforms.load_image(files[index], config.data.max_pixels, min_size=16)
  crop = transforms.train_crop(image, 16, sampler.crop_rng(config.seed, g, k))
  np.testing.assert_array_equal(one[g // 4]["image"][g % 4], transforms.to_signed_float(crop))


@pytest.mark.slow  # Starts Grain worker processes.
@pytest.mark.parametrize("num_workers", [1, 2])
def test_worker_processes_yield_the_batches_of_in_process_loading(num_workers):
  config = tiny_config()
  # Process 1 of 2, resumed at global example 40: workers split the stream by whole batches.
  want = take(iter(pipeline.create_train_dataset(config, 1, 2, start=40)), 5)
  config.data.num_workers = num_workers
  it = iter(pipeline.create_train_dataset(config, 1, 2, start=40))
  got = take(it, 5)
  it.close()
  for w, g in zip(want, got):
    assert g["image"].dtype == np.float32 and g["image"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["skipped"], w["skipped"])


# --------------------------------------------------------------------------- eval


def test_eval_set_is_fixed_center_crops():
  config = tiny_config(num_eval_images=16)
  ds = pipeline.create_eval_dataset(config, 0, 1)
  a = list(pipeline.eval_batches(config, ds, 1))
  b = list(pipeline.eval_batches(config, ds, 1))
  assert len(a) == 2 and set(a[0]) == {"image", "weight"}
  assert all(np.all(x["weight"] == 1) for x in a)  # 16 images fill both batches: no padding.
  np.testing.assert_array_equal(a[1]["image"], b[1]["image"])


def test_folder_pipeline_yields_only_good_images(tmp_path):
  good, bad = good_image_files(), bad_image_files()
  write_files(tmp_path, {**good, **bad})
  files = file_lists.list_image_files(str(tmp_path))
  assert len(files) == len(good) + len(bad)
  config = folder_config(tmp_path, num_eval_images=len(files))
  ds = pipeline.create_eval_dataset(config, 0, 1)
  assert len(ds) == len(files)
  for i, path in enumerate(files):  # The eval set walks the sorted files.
    name = os.path.basename(path)
    if name in bad:
      assert ds[i] is None, name
    else:
      want = transforms.eval_view(transforms.load_image(good[name], min_size=16), 16)
      np.testing.assert_allclose(ds[i]["image"], want, atol=2.5 / 127.5, err_msg=name)
  # The batches hold every good image once and pad the unreadable ones' slots with weight 0.
  batches = list(pipeline.eval_batches(config, ds, 1))
  assert len(batches) == pipeline.num_eval_batches(config, 1) == -(-len(files) // 4)
  assert sum(float(b["weight"].sum()) for b in batches) == len(good)


def _write_index_pngs(folder, n):
  """n constant-colour PNGs whose red channel is their index (sorted listing = index order)."""
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    Image.new("RGB", (20, 24), (i, 0, 0)).save(os.path.join(folder, f"{i:03d}.png"))


@pytest.mark.parametrize("global_batch_size,process_count", [(4, 1), (8, 2)])
def test_eval_weights_count_each_readable_held_out_image_once(tmp_path, global_batch_size,
                                                              process_count):
  # 5 readable held-out images and one unreadable one, a per-process batch of 4.
  _write_index_pngs(tmp_path, 5)
  write_files(tmp_path, {"zz_corrupt.png": bad_image_files()["text.png"]})
  config = folder_config(tmp_path, global_batch_size=global_batch_size, num_eval_images=6)
  assert pipeline.per_process_batch_size(global_batch_size, process_count) == 4
  want_batches = pipeline.num_eval_batches(config, process_count)
  seen, total = [], 0.0
  for pi in range(process_count):
    ds = pipeline.create_eval_dataset(config, pi, process_count)
    batches = list(pipeline.eval_batches(config, ds, process_count))
    assert len(batches) == want_batches  # The same count on every process.
    for b in batches:
      assert b["image"].shape == (4, 16, 16, 3) and b["weight"].shape == (4,)
      assert b["weight"].dtype == np.float32 and set(np.unique(b["weight"])) <= {0.0, 1.0}
      real = b["weight"] == 1
      np.testing.assert_array_equal(b["image"][~real], 0)  # Padding: zero images of weight 0.
      seen += _indices({"image": b["image"][real]})
      total += float(b["weight"].sum())
  assert total == 5
  assert sorted(seen) == [0, 1, 2, 3, 4]
