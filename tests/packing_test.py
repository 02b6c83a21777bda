"""The per-image work against PIL directly; duplicates; the held-out draw; the report."""

import io

import numpy as np
from PIL import Image
from PIL import ImageOps

from conftest import MAX_PIXELS
from conftest import bad_image_files
from conftest import encode_image
from conftest import good_image_files
from image_collections_test import big_jpeg
from vae_scale.data import image_collections
from vae_scale.data import pack_report
from vae_scale.data import packing

OPTIONS = packing.PackOptions(max_side=32, jpeg_quality=95, max_pixels=MAX_PIXELS)


def _pack(name, data, options=OPTIONS):
  return packing.pack_item(image_collections.Item(name, f"/x/{name}", data), (0, 0), "", options)


def _reference(data, side):
  """PIL alone: decode, EXIF orientation, RGB over white, shorter side to `side` (bicubic)."""
  img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
  if img.mode in ("RGBA", "LA", "P"):
    img = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img)
  img = img.convert("RGB")
  w, h = img.size
  scale = side / min(w, h)
  return np.asarray(img.resize((max(side, round(w * scale)), max(side, round(h * scale))),
                               Image.Resampling.BICUBIC, reducing_gap=None), np.float64), (w, h)


def _luma(rgb):
  return rgb @ np.array([0.299, 0.587, 0.114])


def test_images_above_max_side_are_shrunk_to_it_others_keep_their_bytes():
  resized = 0
  for name, data in {**good_image_files(), "big.jpg": big_jpeg(3, 96, 72)}.items():
    record = _pack(name, data)
    assert record.reason == "", (name, record.message)
    want, (w, h) = _reference(data, 32)
    assert (record.width, record.height) == (w, h), name
    assert record.sha256 and record.source_bytes == len(data)
    if min(w, h) <= 32:
      assert record.image == data and not record.resized, name
      continue
    resized += 1
    stored = Image.open(io.BytesIO(record.image))
    assert stored.format == "JPEG" and record.resized, name
    got = np.asarray(stored.convert("RGB"), np.float64)
    assert got.shape == want.shape, name
    # JPEG quality 95 on top of the same resize: luma within a few levels on average (these test
    # images are colour noise at 4 px: 4:2:0 chroma is checked on a photograph below).
    assert np.abs(_luma(got) - _luma(want)).mean() < 2.5, name
  assert resized == 6  # rgb.jpg, rgb.webp, gray.jpg, bilevel.png, UPPER.JPEG (48x36), big.jpg.


def test_a_large_jpeg_decodes_at_reduced_scale_and_still_matches_a_full_decode():
  data = big_jpeg(4, 400, 300)  # Shorter side 300 >= 2 * 128: decoded at 1/2 scale first.
  record = _pack("big.jpg", data, packing.PackOptions(max_side=128))
  want, _ = _reference(data, 128)
  got = np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB"), np.float64)
  assert got.shape == want.shape == (128, 171, 3)
  assert np.abs(_luma(got) - _luma(want)).mean() < 2.5


def test_a_photograph_keeps_its_colours_within_a_few_levels():
  import skimage.data  # pylint: disable=g-import-not-at-top
  data = encode_image(Image.fromarray(skimage.data.astronaut()[:300, :400]), "PNG")
  record = _pack("astronaut.png", data, packing.PackOptions(max_side=150))
  want, _ = _reference(data, 150)
  got = np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB"), np.float64)
  assert got.shape == want.shape == (150, 200, 3)
  assert np.abs(got - want).mean() < 2.5, np.abs(got - want).mean()


def test_unusable_files_are_skipped_with_the_trainers_reasons():
  reasons = {name: _pack(name, data).reason for name, data in bad_image_files().items()}
  assert reasons == {"truncated.jpg": "corrupt", "corrupt.jpg": "corrupt",
                     "garbage_after_soi.jpg": "corrupt", "empty.jpg": "empty",
                     "text.png": "not_an_image", "page.jpg": "not_an_image",
                     "huge.png": "too_large"}
  record = _pack("page.jpg", bad_image_files()["page.jpg"])
  assert record.message.startswith("/x/page.jpg: ") and record.image == b""
  unread = packing.pack_item(image_collections.Item("k", "/x/k", b"", reason="unreadable",
                                                    message="PermissionError"), (1, 2), "", OPTIONS)
  assert (unread.reason, unread.ordinal, unread.sha256) == ("unreadable", (1, 2), "")


def test_packing_is_deterministic_byte_for_byte():
  data = big_jpeg(5, 96, 72)
  assert _pack("a.jpg", data).image == _pack("a.jpg", data).image


def test_the_first_of_each_content_is_kept_in_any_arrival_order():
  records = [packing.Record((u, p), f"k{u}{p}", "", "", sha256=s)
             for (u, p), s in [((0, 1), "a"), ((0, 0), "b"), ((1, 0), "a"), ((0, 2), "a")]]
  assert packing.Dedup.first_of([r for r in records if r.sha256 == "a"]).ordinal == (0, 1)
  dedup = packing.Dedup()
  ordered = sorted(records, key=lambda r: r.ordinal)
  assert [r.ordinal for r in ordered if dedup.keep(r)] == [(0, 0), (0, 1)]


def test_the_held_out_draw_is_seeded_by_key_and_holds_out_at_least_one():
  keys = [f"img{i:05d}.jpg" for i in range(20_000)]
  records = [packing.Record((0, i), k, "", "") for i, k in enumerate(keys)]
  low = min(packing.eval_hash(k, 3) for k in keys)
  draw = packing.EvalDraw(0.05, 3, low)
  held = [r.key for r in records if draw.split_of(r) == "validation"]
  assert abs(len(held) - 1000) < 4 * np.sqrt(1000 * 0.95)  # Binomial(20000, 0.05).
  assert held == [r.key for r in reversed(records[::-1]) if draw.split_of(r) == "validation"]
  other_seed = packing.EvalDraw(0.05, 4, low)
  assert held != [r.key for r in records if other_seed.split_of(r) == "validation"]
  # Adding images moves no old one between splits.
  more = [packing.Record((1, i), f"new{i}", "", "") for i in range(100)]
  assert [r.key for r in records + more if draw.split_of(r) == "validation"][:len(held)] == held
  tiny = [packing.Record((0, i), k, "", "") for i, k in enumerate(["a", "b", "c"])]
  low = min(packing.eval_hash(r.key, 0) for r in tiny)
  assert sum(packing.EvalDraw(1e-9, 0, low).split_of(r) == "validation" for r in tiny) == 1
  assert all(packing.EvalDraw(0.0, 0, low).split_of(r) == "train" for r in tiny)
  named = packing.Record((0, 0), "a", "", "validation")
  assert packing.EvalDraw(0.0, 0, None).split_of(named) == "validation"


def test_the_report_is_the_same_whatever_order_or_grouping_records_arrive_in():
  records = [packing.Record((u, p), f"k{u}{p}", f"/x/{u}/{p}", "",
                            reason="corrupt" if (u + p) % 3 == 0 else "", image=b"xy",
                            source_bytes=5, resized=p % 2 == 0, caption="c" if p == 1 else "")
             for u in range(6) for p in range(5)]
  whole = pack_report.Report(first_n=4)
  for r in records:
    whole.add_record(r)
    if not r.reason:
      whole.add_kept(r, "train")
  parts = [pack_report.Report(first_n=4) for _ in range(3)]
  for i, r in enumerate(reversed(records)):
    parts[i % 3].add_record(r)
    if not r.reason:
      parts[(i + 1) % 3].add_kept(r, "train")
  merged = parts[0].merge(parts[1]).merge(parts[2])
  assert merged.result(name="x") == whole.result(name="x")
  got = whole.result()
  assert got["skipped_by_reason"] == {"corrupt": 10} and got["images_kept"] == 20
  assert [e["path"] for e in got["first_skipped"]] == ["/x/0/0", "/x/0/3", "/x/1/2", "/x/2/1"]
  assert got["stored_image_bytes"] == 40 and got["source_bytes_of_kept"] == 100
