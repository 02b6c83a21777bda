"""pipeline: the train stream (determinism, disjoint process shares, iterator state restore) and the
eval set (fixed center crops, unreadable files dropped, weight-0 padding)."""

import json
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
from vae_scale import transforms
from vae_scale.data import file_lists
from vae_scale.data import pipeline


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


def test_iterator_state_restores_the_identical_next_batch():
  config = tiny_config()
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  take(it, 2)
  state = it.get_state()
  want = next(it)
  it2 = iter(pipeline.create_train_dataset(config, 0, 1))
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["image"], want["image"])


@pytest.mark.slow  # Starts Grain worker processes.
def test_worker_pipeline_state_restores_the_identical_next_batch():
  config = tiny_config(**{"data.num_workers": 2})
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # As the Orbax handler stores it.
  want = take(it, 2)
  it.close()
  it2 = iter(pipeline.create_train_dataset(config, 0, 1))
  it2.set_state(state)
  got = take(it2, 2)
  it2.close()
  for w, g in zip(want, got):
    assert g["image"].dtype == np.float32 and g["image"].shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(g["image"], w["image"])


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
