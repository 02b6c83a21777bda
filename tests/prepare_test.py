"""`python -m vae_scale.prepare` end to end: folders, manifests and webdataset tars in, a TFDS
dataset out that the trainer, evaluate and encode read; counts, determinism, reruns, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import MAX_PIXELS
from conftest import bad_image_files
from conftest import encode_image
from conftest import good_image_files
from conftest import random_photo
from conftest import tiny_config
from conftest import write_files
from image_collections_test import big_jpeg
from image_collections_test import make_folder
from image_collections_test import webdataset_samples
from image_collections_test import write_tar
from vae_scale.data import pipeline
from vae_scale.data import sources
from vae_scale.errors import ConfigError
from vae_scale.errors import DataError
from vae_scale.tools import prepare as prepare_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(max_side=32, image_size=16, max_pixels=MAX_PIXELS, chunk_size=5, num_workers=1)


def _options(src, out, name="pack", **overrides):
  return prepare_lib.PrepareOptions(src=str(src), out=str(out), name=name, **{**SMALL, **overrides})


def _read(out, name, split):
  """Every example of a split, in stored order, the image as its file's bytes."""
  source = tfds.data_source(name, split=split, data_dir=str(out),
                            decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def _version_files(out, name="pack"):
  folder = os.path.join(out, name, "1.0.0")
  return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def folder_pack(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  folder = make_folder(str(root))
  report = prepare_lib.prepare(_options(folder, root / "out", eval_fraction=0.25))
  return folder, str(root / "out"), report


def test_a_folder_becomes_a_dataset_with_every_image_counted(folder_pack):
  folder, out, report = folder_pack
  good, bad = good_image_files(), bad_image_files()
  assert report["images_listed"] == len(good) + len(bad) + 4
  assert report["skipped_by_reason"] == {"corrupt": 3, "empty": 1, "not_an_image": 2,
                                         "too_large": 1}
  assert report["duplicates_dropped"] == 1 and report["images_kept"] == len(good) + 3
  assert sum(report["kept_by_split"].values()) == report["images_kept"]
  assert report["kept_by_split"]["validation"] >= 1
  assert report["resized"] == 8 and report["with_caption"] == 1  # 5 of good_image_files + 3 big.
  assert [e["path"] for e in report["first_skipped"]] == sorted(
      os.path.join(folder, "bad", n) for n in bad)
  train, held = _read(out, "pack", "train"), _read(out, "pack", "validation")
  assert (len(train), len(held)) == (report["kept_by_split"]["train"],
                                     report["kept_by_split"]["validation"])
  by_key = {e["key"].decode(): e for e in train + held}
  assert len(by_key) == report["images_kept"]
  assert set(by_key) == {*good, "big/big0.jpg", "big/big1.jpg", "big/big2.jpg"}
  assert by_key["tiny.png"]["image"] == good["tiny.png"]  # Small: the original bytes.
  assert by_key["big/big1.jpg"]["caption"].decode() == "a red sky"
  assert (by_key["big/big2.jpg"]["width"], by_key["big/big2.jpg"]["height"]) == (96, 72)
  assert (by_key["exif_rotated.jpg"]["width"], by_key["exif_rotated.jpg"]["height"]) == (20, 40)
  on_disk = json.load(open(os.path.join(out, "pack", "1.0.0", "prepare_report.json")))
  assert on_disk == {k: v for k, v in report.items() if k in on_disk} and "pack_seconds" not in (
      on_disk)
  assert sorted(os.listdir(out)) == ["pack"]  # The work folder is gone; no downloads/ folder.


def test_train_evaluate_and_encode_read_it_through_data_dir_slash_name(folder_pack):
  _, out, report = folder_pack
  config = tiny_config(**{"data.source": "tfds", "data.tfds_name": os.path.join(out, "pack"),
                          "global_batch_size": 4, "num_eval_images": 4})
  train = sources.make_source(config, "train")
  assert len(train) == report["kept_by_split"]["train"] and isinstance(train[0], bytes)
  batch = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["skipped"].sum() == 0
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1
  held = list(pipeline.eval_batches(config, pipeline.create_eval_dataset(config, 0, 1), 1))
  assert held[0]["weight"].sum() == min(4, report["kept_by_split"]["validation"])
  encoded = list(pipeline.share_dataset(config, train, 0, 1, batch_size=8))
  assert sum(len(b["index"]) for b in encoded) == len(train)


def test_a_manifest_held_out_and_webdataset_shards_trained(tmp_path):
  held_folder = str(tmp_path / "held")
  write_files(held_folder, {"h0.jpg": big_jpeg(20), "h1.png": good_image_files()["rgb16.png"],
                            "copy_in_tars.jpg": big_jpeg(10)})
  (tmp_path / "held.txt").write_text("held/h0.jpg\nheld/h1.png\nheld/copy_in_tars.jpg\n")
  for s in range(3):
    write_tar(str(tmp_path / "shards" / f"{s:05d}.tar"), webdataset_samples(s))
  report = prepare_lib.prepare(_options(tmp_path / "shards" / "{00000..00002}.tar",
                                        tmp_path / "out", eval_src=str(tmp_path / "held.txt")))
  # Per tar: 3 usable, an HTML page, a video, a json-only sample; the first and the last image
  # of each tar are copies of a held-out image, which is kept where it was held out.
  assert report["images_listed"] == 3 + 3 * 6
  assert report["skipped_by_reason"] == {"no_image": 3, "not_an_image": 6}
  assert report["kept_by_split"] == {"train": 3, "validation": 3}
  assert report["duplicates_dropped"] == 6
  train = _read(tmp_path / "out", "pack", "train")
  assert sorted(e["key"].decode() for e in train) == [
      f"{s:05d}.tar/000001" for s in range(3)]
  assert {e["caption"].decode() for e in train} == {"from json"}
  held = _read(tmp_path / "out", "pack", "validation")
  assert sorted(e["key"].decode() for e in held) == ["copy_in_tars.jpg", "h0.jpg", "h1.png"]


def test_two_prepares_write_the_same_bytes_and_a_rerun_returns_at_once(folder_pack, tmp_path):
  folder, out, report = folder_pack
  again = prepare_lib.prepare(_options(folder, tmp_path / "out", eval_fraction=0.25,
                                       num_workers=2))
  assert _version_files(str(tmp_path / "out")) == _version_files(out)
  assert again["fingerprint"] == report["fingerprint"] and again["workers"] == 2
  done = prepare_lib.prepare(_options(folder, tmp_path / "out", eval_fraction=0.25))
  assert done["already_prepared"] and done["images_kept"] == report["images_kept"]


def test_another_dataset_of_that_name_is_refused_unless_overwrite(folder_pack, tmp_path):
  folder, _, _ = folder_pack
  prepare_lib.prepare(_options(folder, tmp_path, eval_fraction=0.25))
  before = _version_files(str(tmp_path))
  with pytest.raises(DataError, match=r"already holds a dataset 'pack' \(1.0.0\) that was made "
                     r"from other images or options .*pass --overwrite"):
    prepare_lib.prepare(_options(folder, tmp_path, eval_fraction=0.5))
  assert _version_files(str(tmp_path)) == before
  report = prepare_lib.prepare(_options(folder, tmp_path, eval_fraction=0.5, overwrite=True))
  assert json.load(open(tmp_path / "pack" / "1.0.0" / "prepare_report.json"))["fingerprint"] == (
      report["fingerprint"])
  (tmp_path / "other" / "2.0.0").mkdir(parents=True)
  (tmp_path / "other" / "2.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(DataError, match=r"'other' \(2.0.0\) that was not made by vae_scale"):
    prepare_lib.prepare(_options(folder, tmp_path, name="other"))


@pytest.mark.parametrize("overrides, message", [
    (dict(max_side=128, image_size=256), r"--max_side=128 is below --image_size=256"),
    (dict(name="My-Set"), r"--name='My-Set': use lower case"),
    (dict(eval_fraction=1.0), r"--eval_fraction=1.0: must be in \[0, 1\)"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    prepare_lib.prepare(_options(tmp_path / "missing", tmp_path / "out", **overrides))
  assert not (tmp_path / "out").exists()


def _cli(*args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "vae_scale.prepare", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(tmp_path):
  (tmp_path / "empty").mkdir()
  write_tar(str(tmp_path / "cut.tar"), webdataset_samples(), truncate_at=3000)
  cases = [
      ([f"--src={tmp_path / 'empty'}"], r"empty holds no images"),
      ([f"--src={tmp_path / 'cut.tar'}"], r"cut\.tar: truncated or not a tar .*re-download"),
      ([f"--src={tmp_path / 'empty'}", "--max_side=8"], r"--max_side=8 is below --image_size"),
  ]
  procs = [_cli(*args, f"--out={tmp_path / 'out'}", "--name=pack", "--num_workers=1")
           for args, _ in cases]
  for proc, (_, message) in zip(procs, cases):
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, stderr[-2000:]
    (line,) = _error_lines(stderr)
    assert __import__("re").search(message, line), line
  assert not (tmp_path / "out" / "pack").exists()


@pytest.mark.slow
def test_a_killed_prepare_is_invisible_and_a_rerun_finishes_it(tmp_path):
  folder = str(tmp_path / "photos")
  # PNGs (no reduced-scale decoding): ~1 s of packing, for the kill to land mid-way.
  write_files(folder, {f"p{i:03d}.png": encode_image(random_photo(300, 225, seed=i), "PNG")
                       for i in range(240)})
  work = tmp_path / "work"
  args = [f"--src={folder}", f"--out={tmp_path / 'out'}", "--name=pack", "--max_side=64",
          "--image_size=16", "--chunk_size=4", "--num_workers=1", f"--work_dir={work}"]
  proc = _cli(*args)
  units = work / "units"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and (
      len(list(units.glob("*.json"))) if units.exists() else 0) < 5:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  staged = len(list(units.glob("*.json")))
  assert 5 <= staged < 60, staged  # Killed mid-way through the 60 units.
  config = tiny_config(**{"data.source": "tfds", "data.tfds_name": str(tmp_path / "out" / "pack")})
  with pytest.raises(DataError, match="is not prepared"):
    sources.make_source(config, "train")
  # A build killed inside TFDS leaves its incomplete folder; the rerun clears it.
  (tmp_path / "out" / "pack" / "incomplete.ABCDEF_1.0.0").mkdir(parents=True)
  rerun = _cli(*args)
  stdout, stderr = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, stderr[-3000:]
  report = json.loads(stdout.strip().splitlines()[-1])
  # The rerun redoes only the units that were not committed (here: none was in flight).
  assert (report["units_reused"], report["units_packed"]) == (staged, 60 - staged)
  assert report["images_kept"] == 240 and report["resized"] == 240
  assert sorted(os.listdir(tmp_path / "out" / "pack")) == ["1.0.0"] and not work.exists()
  clean = prepare_lib.prepare(_options(folder, tmp_path / "clean", max_side=64, chunk_size=4,
                                       max_pixels=prepare_lib.PrepareOptions.max_pixels,
                                       work_dir=str(tmp_path / "work2")))
  assert clean["fingerprint"] == report["fingerprint"]
  assert _version_files(str(tmp_path / "clean")) == _version_files(str(tmp_path / "out"))
  assert len(sources.make_source(config, "train")) == report["kept_by_split"]["train"]
  np.testing.assert_array_less(0, report["kept_by_split"]["validation"])
