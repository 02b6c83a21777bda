"""file_lists: recursive scans, globs and manifests in one sorted order, the workdir cache, the
held-out split, and clear errors for missing or empty folders."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from vae_scale.data import file_lists
from vae_scale.data import pipeline
from vae_scale.data import sources
from vae_scale.errors import DataError


def _write_images(folder, n, size=(40, 30)):
  rng = np.random.default_rng(0)
  os.makedirs(folder / "sub", exist_ok=True)
  for i in range(n):
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    ext = ("png", "jpg", "webp")[i % 3]
    Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"img_{i}.{ext}")


def test_folder_source_recursive_sorted_and_held_out(tmp_path):
  _write_images(tmp_path, 12)
  (tmp_path / "notes.txt").write_text("not an image")
  files = file_lists.list_image_files(str(tmp_path))
  assert len(files) == 12 and files == sorted(files)
  config = tiny_config(**{"data.source": "folder", "data.path": str(tmp_path),
                          "data.eval_fraction": 0.25, "global_batch_size": 4})
  train_src = sources.make_source(config, "train")
  eval_src = sources.make_source(config, "eval")
  assert len(train_src) == 9 and len(eval_src) == 3
  assert not {train_src[i] for i in range(9)} & {eval_src[i] for i in range(3)}
  batch = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  assert batch["image"].shape == (4, 16, 16, 3)


def test_manifest_glob_and_scan_give_the_same_order(tmp_path):
  _write_images(tmp_path, 12)
  files = file_lists.list_image_files(str(tmp_path))
  assert file_lists.list_image_files(str(tmp_path / "**" / "*.*")) == files
  # A manifest in any order, relative and absolute lines, comments, blanks and duplicates.
  lines = [os.path.relpath(f, tmp_path) for f in reversed(files[1:])] + [files[0], files[3]]
  manifest = tmp_path / "list.txt"
  manifest.write_text("# my images\n\n" + "\n".join(lines) + "\n")
  assert file_lists.list_image_files(str(manifest)) == files
  # The etils path (gs:// and other remote filesystems) lists what the local scan does.
  scan_epath = file_lists._scan_epath  # pylint: disable=protected-access
  assert sorted(scan_epath(str(tmp_path))) == files
  assert sorted(scan_epath(str(tmp_path / "**" / "*.jpg"))) == [f for f in files
                                                                 if f.endswith(".jpg")]


def test_listing_is_cached_in_the_workdir(tmp_path, monkeypatch):
  data, workdir = tmp_path / "data", tmp_path / "work"
  _write_images(data, 6)
  files = file_lists.list_image_files(str(data), cache_dir=str(workdir))
  assert len(list((workdir / "file_lists").glob("*.txt"))) == 1
  _write_images(data, 9)  # New files after the first listing: a restart keeps the old list.

  def no_scan(*args, **kwargs):
    raise AssertionError("rescanned")
  monkeypatch.setattr(os, "walk", no_scan)
  assert file_lists.list_image_files(str(data), cache_dir=str(workdir)) == files
  config = tiny_config(**{"data.source": "folder", "data.path": str(data),
                          "data.eval_fraction": 0.2})
  assert len(sources.make_source(config, "train", workdir=str(workdir))) == 5
  monkeypatch.undo()
  for f in (workdir / "file_lists").iterdir():
    f.unlink()
  assert len(file_lists.list_image_files(str(data), cache_dir=str(workdir))) == 9


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    file_lists.list_image_files(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no images"):
    file_lists.list_image_files(str(tmp_path / "empty"))
