"""Listing and reading collections: folders, manifests, webdataset tars (brace lists, captions,
non-image members, truncated tars). Also the collection helpers the prepare tests share."""

import io
import json
import os
import tarfile

import pytest

from conftest import bad_image_files
from conftest import encode_image
from conftest import good_image_files
from conftest import random_photo
from conftest import write_files
from vae_scale.data import image_collections
from vae_scale.errors import DataError


def write_tar(path, samples, truncate_at=None):
  """A webdataset shard: samples = [(key, {ext: bytes})], members in order; `truncate_at` cuts
  the file to that many bytes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}{ext}")
        info.size, info.mtime = len(data), 0  # Fixed mtime: the same bytes on every run.
        tar.addfile(info, io.BytesIO(data))
  data = buf.getvalue()
  with open(path, "wb") as f:
    f.write(data if truncate_at is None else data[:truncate_at])


def big_jpeg(seed, w=96, h=72):
  return encode_image(random_photo(w, h, seed=seed), "JPEG", quality=90)


def make_folder(root):
  """Every good and bad kind of file, 3 images to shrink (96x72, one with a caption), and an exact
  duplicate of one of them. Returns the folder."""
  folder = os.path.join(root, "images")
  write_files(folder, good_image_files())
  write_files(os.path.join(folder, "bad"), bad_image_files())
  write_files(os.path.join(folder, "big"), {f"big{i}.jpg": big_jpeg(i) for i in range(3)})
  write_files(os.path.join(folder, "big"), {"big1.txt": b"a red sky\n"})
  write_files(os.path.join(folder, "dup"), {"copy_of_big0.jpg": big_jpeg(0)})
  return folder


def webdataset_samples(shard=0):
  """[(key, members)]: captions in .txt and in .json, an HTML page named .jpg, a sample whose only
  member is a video, one with metadata only, and a duplicate of the first image (the same in
  every shard; the second image differs by shard)."""
  return [
      ("000000", {".jpg": big_jpeg(10), ".txt": b"first caption", ".json": b'{"caption": "x"}'}),
      ("000001", {".png": encode_image(random_photo(30, 20, seed=11 + shard), "PNG"),
                  ".json": b'{"caption": "from json"}'}),
      ("000002", {".jpg": b"<html>404</html>", ".txt": b"lost"}),
      ("000003", {".mp4": b"\0\0\0\x18ftypmp42"}),
      ("000004", {".json": b'{"status": "failed"}'}),
      ("000005", {".jpg": big_jpeg(10)}),
  ]


def test_brace_lists_expand_like_webdatasets():
  assert image_collections.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar",
                                                                  "s-002.tar"]
  assert image_collections.expand_braces("{a,b}/{8..10}.tar") == [
      "a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
  assert image_collections.expand_braces("plain/path") == ["plain/path"]


def test_a_folder_is_chunked_in_sorted_order_with_keys_relative_to_it(tmp_path):
  folder = make_folder(str(tmp_path))
  units = image_collections.list_units(folder, chunk_size=5)
  files = [f for u in units for f in u.files]
  assert files == sorted(files) and len(files) == len(good_image_files()) + len(
      bad_image_files()) + 4
  assert [len(u.files) for u in units[:-1]] == [5] * (len(units) - 1)
  assert [u.index for u in units] == list(range(len(units)))
  items = [i for u in units for i in image_collections.read_unit(u)]
  by_key = {i.key: i for i in items}
  assert by_key["big/big1.jpg"].caption == "a red sky"
  assert by_key["big/big0.jpg"].caption == "" and by_key["rgb.jpg"].data == good_image_files()[
      "rgb.jpg"]
  assert by_key["big/big0.jpg"].data == by_key["dup/copy_of_big0.jpg"].data


def test_a_manifest_and_a_glob_list_the_same_files(tmp_path):
  folder = make_folder(str(tmp_path))
  (tmp_path / "list.txt").write_text("# two files\nimages/big/big0.jpg\n\nimages/rgb.jpg\n")
  units = image_collections.list_units(str(tmp_path / "list.txt"))
  assert [os.path.relpath(f, folder) for f in units[0].files] == ["big/big0.jpg", "rgb.jpg"]
  globbed = image_collections.list_units(os.path.join(folder, "big", "*.jpg"))
  assert [i.key for i in image_collections.read_unit(globbed[0])] == [
      "big0.jpg", "big1.jpg", "big2.jpg"]


def test_webdataset_samples_carry_captions_and_name_what_is_not_an_image(tmp_path):
  for s in range(2):
    write_tar(str(tmp_path / "shards" / f"part-{s:03d}.tar"), webdataset_samples())
  units = image_collections.list_units(str(tmp_path / "shards" / "part-{000..001}.tar"))
  assert [os.path.basename(u.tar) for u in units] == ["part-000.tar", "part-001.tar"]
  items = list(image_collections.read_unit(units[1]))
  assert [i.key for i in items] == [f"part-001.tar/00000{k}" for k in range(6)]
  assert [i.caption for i in items[:3]] == ["first caption", "from json", "lost"]
  assert [i.reason for i in items] == ["", "", "", "not_an_image", "no_image", ""]
  assert items[3].where.endswith("part-001.tar:000003.mp4")
  assert items[0].data == items[5].data == big_jpeg(10)
  assert image_collections.list_units(str(tmp_path / "shards" / "*.tar")) == units


def test_a_repeated_key_in_a_tar_is_skipped_not_merged(tmp_path):
  samples = webdataset_samples()[:2] + [webdataset_samples()[0]]
  write_tar(str(tmp_path / "t.tar"), samples)
  items = list(image_collections.read_unit(image_collections.list_units(str(tmp_path / "t.tar"))[0]))
  assert [i.reason for i in items] == ["", "", "duplicate_key"]


def test_a_truncated_tar_is_one_line_naming_it(tmp_path):
  write_tar(str(tmp_path / "t.tar"), webdataset_samples(), truncate_at=3000)
  unit = image_collections.list_units(str(tmp_path / "t.tar"))[0]
  with pytest.raises(DataError, match=r"t\.tar: truncated or not a tar .*re-download it"):
    list(image_collections.read_unit(unit))


@pytest.mark.parametrize("src, message", [
    ("missing_dir", r"missing_dir does not exist; give a folder"),
    ("empty_dir", r"empty_dir holds no images"),
    ("shards/none-{0..1}.tar", r"none-0\.tar does not exist"),
    ("shards/*.tar", r"matches no \.tar shards"),
])
def test_sources_without_images_are_one_line(tmp_path, src, message):
  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "empty_dir" / "notes.md").write_text("no images")
  (tmp_path / "shards").mkdir()
  with pytest.raises(DataError, match=message) as e:
    image_collections.list_units(str(tmp_path / src))
  assert "\n" not in str(e.value) and "--src=" in str(e.value)


def test_json_metadata_that_is_not_an_object_costs_only_the_caption(tmp_path):
  write_tar(str(tmp_path / "t.tar"), [("a", {".jpg": big_jpeg(1), ".json": json.dumps([1]).encode()})])
  (item,) = image_collections.read_unit(image_collections.list_units(str(tmp_path / "t.tar"))[0])
  assert item.reason == "" and item.caption == ""
