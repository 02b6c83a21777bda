"""A packed image collection on disk: a TFDS dataset in ArrayRecord files, written by TFDS itself.

`build` runs TFDS's `AdhocBuilder` (what `tfds.dataset_builders.store_as_tfds_dataset` runs) with
file_format='array_record', so `dataset_info.json`, the splits, shard lengths and
`tfds.data_source` come from TFDS; the only addition is `prepare_report.json`, written into the
version folder before TFDS commits it. Layout: `DATA_DIR/NAME/1.0.0/{dataset_info.json,
features.json, prepare_report.json, NAME-train.array_record-00000-of-0000N, ...}`.

Commit points, so a reader never opens a half-written dataset:
- local: TFDS writes into `DATA_DIR/NAME/incomplete.XXXXXX_1.0.0/` and renames it to `1.0.0` when
  everything is in place (one atomic rename). A killed build leaves only the incomplete folder,
  which TFDS does not read and the next prepare deletes (`clean_incomplete`).
- gs://: ArrayRecord's writer writes local files only, so the dataset is built in a local work
  folder and then `publish`ed: the report first, then the shards, then `dataset_info.json` last;
  TFDS sees a version folder only once its dataset_info.json is there (object stores have no
  atomic folder rename, but a single object appears whole or not at all).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core.dataset_builders import adhoc_builder

from vae_scale.data import pack_report

VERSION = "1.0.0"
INFO_FILE = "dataset_info.json"
_INCOMPLETE = "incomplete."  # TFDS's prefix for folders and files being written.


def features() -> tfds.features.FeaturesDict:
  """The packed example: the stored image file (JPEG, or the original PNG/WebP/JPEG bytes), its
  key in the collection, the original's displayed height and width, and its caption ('' if none).
  Read the image undecoded (`tfds.decode.SkipDecoding()`) and decode it as the trainer does."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "key": tfds.features.Text(),
      "height": tfds.features.Scalar(np.int32),
      "width": tfds.features.Scalar(np.int32),
      "caption": tfds.features.Text(),
  })


class PackedImages(adhoc_builder.AdhocBuilder, skip_registration=True):
  """TFDS's AdhocBuilder that also writes `prepare_report.json` into the version folder while it
  is still TFDS's incomplete folder, so the report is committed with the data.

  Args:
    report: called after every split is written; returns the report (None: written by the
      pipeline itself, see `packed_beam`).
    **kwargs: AdhocBuilder's (name, version, features, split_datasets, data_dir, description,
      file_format).
  """

  def __init__(self, *, report: Callable[[], dict[str, Any]] | None, **kwargs: Any):
    self._report = report
    super().__init__(**kwargs)

  def _download_and_prepare(self, dl_manager, download_config) -> None:  # pytype: disable=signature-mismatch
    super()._download_and_prepare(dl_manager, download_config)
    if self._report is not None:
      write_report(epath.Path(self.data_dir), self._report())


def write_report(version_dir: epath.Path, report: dict[str, Any]) -> None:
  (version_dir / pack_report.REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")


def build(builder_cls: type[PackedImages], name: str, data_dir: str,
          split_datasets: Mapping[str, Any], description: str, download_dir: str,
          beam_options: Any = None, **builder_kwargs: Any) -> epath.Path:
  """Writes the dataset with TFDS's writer; returns its version folder.

  Args:
    builder_cls: PackedImages (examples from Python iterables) or packed_beam's subclass.
    split_datasets: split name -> iterable of (key, example) (see `packing.example`).
    download_dir: TFDS's downloads folder (nothing is downloaded, but TFDS makes it; the work
      folder keeps it out of the data_dir).
    beam_options: Beam PipelineOptions for a Beam build (None: local).
  """
  builder = builder_cls(name=name, version=VERSION, features=features(),
                        split_datasets=split_datasets, data_dir=data_dir,
                        description=description, file_format="array_record", **builder_kwargs)
  if builder.is_prepared():  # The caller removes an old dataset first; never reuse one silently.
    raise RuntimeError(f"{builder.data_dir} is already prepared")
  with _sorted_feature_maps():
    builder.download_and_prepare(
        download_dir=download_dir, file_format="array_record",
        download_config=tfds.download.DownloadConfig(beam_options=beam_options))
  return epath.Path(builder.data_dir)


@contextlib.contextmanager
def _sorted_feature_maps() -> Iterator[None]:
  """Makes TFDS serialize each tf.train.Example with its features in sorted order, while it builds.

  TFDS calls `SerializeToString()`, and protobuf writes a map (an Example's features) in its hash
  table's order, which differs from process to process: the same examples became other bytes in
  another process (measured: identical examples, different shards). Sorted, the shards are the
  same bytes on every run. Scoped to the build; Beam workers in other processes (a distributed
  runner) do not get it: same examples, possibly other bytes.
  """
  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


# --------------------------------------------------------------------------- what is there


def version_dir(data_dir: str, name: str) -> epath.Path:
  return epath.Path(data_dir) / name / VERSION


def prepared_versions(data_dir: str, name: str) -> list[epath.Path]:
  """Version folders of `name` that TFDS would open (they hold a dataset_info.json)."""
  folder = epath.Path(data_dir) / name
  if not folder.exists():
    return []
  return sorted(p for p in folder.iterdir() if not p.name.startswith(_INCOMPLETE)
                and (p / INFO_FILE).exists())


def read_report(folder: epath.Path) -> dict[str, Any] | None:
  """The prepare report in a version folder; None if there is none (not made by vae_scale)."""
  try:
    return json.loads((folder / pack_report.REPORT_FILE).read_text())
  except (OSError, ValueError):
    return None


def clean_incomplete(data_dir: str, name: str) -> None:
  """Deletes the incomplete folders of killed TFDS builds of `name` (one prepare per NAME at a
  time: a concurrent build's folder would go too)."""
  folder = epath.Path(data_dir) / name
  if not folder.exists():
    return
  for path in folder.iterdir():
    if path.name.startswith(_INCOMPLETE) and path.name.endswith("_" + VERSION):
      logging.info("Deleting %s (left by an interrupted build)", path)
      path.rmtree()


def publish(built: epath.Path, dest: epath.Path, fingerprint: str) -> None:
  """Copies a built version folder to `dest` (gs://...), dataset_info.json last.

  A rerun after an interrupted publish of the same job (same fingerprint in dest's report) copies
  only what is missing or of another size; a partial folder of another job is replaced.
  """
  if dest.exists() and (read_report(dest) or {}).get("fingerprint") != fingerprint:
    logging.info("Replacing %s (a partial copy of another prepare)", dest)
    dest.rmtree()
  dest.mkdir(parents=True, exist_ok=True)
  report = built / pack_report.REPORT_FILE
  files = [report] + sorted(p for p in built.iterdir() if p.name not in (
      INFO_FILE, pack_report.REPORT_FILE)) + [built / INFO_FILE]
  for path in files:
    target = dest / path.name
    if path.name != INFO_FILE and target.exists() and target.stat().length == path.stat().length:
      continue
    logging.info("Copying %s to %s", path.name, dest)
    path.copy(target, overwrite=True)

