"""What a reader can see of a packed dataset while it is written: the gs:// publish (built locally,
copied with dataset_info.json last), TFDS's leftovers of killed builds, datasets of other jobs."""

import json
import os

import pytest

from image_collections_test import make_folder
from prepare_test import _options
from prepare_test import _version_files
from vae_scale.data import packed_dataset
from vae_scale.errors import DataError
from vae_scale.tools import prepare as prepare_lib


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("built")
  report = prepare_lib.prepare(_options(make_folder(str(root)), root / "out"))
  return str(root / "out"), report


def _tfds_sees(data_dir):
  return [v.name for v in packed_dataset.prepared_versions(str(data_dir), "pack")]


def test_an_interrupted_publish_is_invisible_and_a_rerun_completes_it(built, tmp_path):
  out, report = built
  source = packed_dataset.version_dir(out, "pack")
  dest = packed_dataset.version_dir(str(tmp_path), "pack")
  packed_dataset.publish(source, dest, report["fingerprint"])
  assert _tfds_sees(tmp_path) == ["1.0.0"] and _version_files(str(tmp_path)) == _version_files(out)
  # Killed before the end: dataset_info.json (last) and a shard missing, another shard cut short.
  (dest / "dataset_info.json").unlink()
  (dest / "pack-validation.array_record-00000-of-00001").unlink()
  shard = dest / "pack-train.array_record-00000-of-00001"
  shard.write_bytes(shard.read_bytes()[:100])
  assert _tfds_sees(tmp_path) == []
  packed_dataset.publish(source, dest, report["fingerprint"])
  assert _version_files(str(tmp_path)) == _version_files(out)


def test_a_partial_copy_of_another_job_is_replaced_not_mixed_in(built, tmp_path):
  out, report = built
  dest = packed_dataset.version_dir(str(tmp_path), "pack")
  dest.mkdir(parents=True)
  (dest / "prepare_report.json").write_text(json.dumps({"fingerprint": "another job"}))
  (dest / "pack-train.array_record-00000-of-00009").write_bytes(b"stale")
  packed_dataset.publish(packed_dataset.version_dir(out, "pack"), dest, report["fingerprint"])
  assert _version_files(str(tmp_path)) == _version_files(out)


def test_a_remote_out_is_built_locally_then_published(built, tmp_path, monkeypatch):
  out, report = built
  remote = str(tmp_path / "bucket")
  monkeypatch.setattr(prepare_lib, "_is_remote", lambda path: path == remote)
  folder = report["src"]
  work = str(tmp_path / "work")
  got = prepare_lib.prepare(_options(folder, remote, work_dir=work, keep_work_dir=True))
  assert _version_files(remote) == _version_files(out) and got["images_kept"] == (
      report["images_kept"])
  assert os.path.isdir(os.path.join(work, "build", "pack", "1.0.0"))
  # A publish killed half-way: the rerun only copies (nothing is packed or built again).
  os.remove(os.path.join(remote, "pack", "1.0.0", "dataset_info.json"))
  again = prepare_lib.prepare(_options(folder, remote, work_dir=work))
  assert "images_packed" not in again and _version_files(remote) == _version_files(out)
  assert not os.path.exists(work)


def test_leftovers_of_killed_tfds_builds_are_cleared(tmp_path):
  for name in ("incomplete.ABC123_1.0.0", "incomplete.XYZ789_1.0.0", "1.0.0"):
    (tmp_path / "pack" / name).mkdir(parents=True)
  (tmp_path / "pack" / "1.0.0" / "dataset_info.json").write_text("{}")
  packed_dataset.clean_incomplete(str(tmp_path), "pack")
  assert sorted(os.listdir(tmp_path / "pack")) == ["1.0.0"]
  assert _tfds_sees(tmp_path) == ["1.0.0"] and packed_dataset.read_report(
      packed_dataset.version_dir(str(tmp_path), "pack")) is None


def test_no_dataset_is_no_error_and_one_without_a_report_is_not_ours(tmp_path):
  assert _tfds_sees(tmp_path) == []
  (tmp_path / "pack" / "1.0.0").mkdir(parents=True)
  (tmp_path / "pack" / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(DataError, match="not made by vae_scale.prepare"):
    prepare_lib.prepare(_options(make_folder(str(tmp_path)), tmp_path))
