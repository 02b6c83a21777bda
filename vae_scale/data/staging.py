"""The local prepare's resumable middle: each work unit's records, committed to a work folder.

A unit is staged as `NNNNNN.bin` (the stored image bytes, concatenated) and then `NNNNNN.json`
(every record's fields, with offsets into the .bin); the .json is the commit marker, written last
and by an atomic rename (on gs://, an object appears whole or not at all). A rerun reads the
committed units and packs only the others, so an interrupted prepare redoes at most the units that
were in flight. `job.json` names the job (its fingerprint): a work folder of another job is
cleared rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Iterable, Iterator

import numpy as np
from etils import epath

from vae_scale.data import image_collections
from vae_scale.data import pack_report
from vae_scale.data import packing

JOB_FILE = "job.json"


def _atomic_write(path: epath.Path, data: bytes) -> None:
  if "://" in str(path):  # An object store: the object appears when its upload completes.
    path.write_bytes(data)
    return
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  tmp.write_bytes(data)
  tmp.replace(path)


def open_job(work_dir: str, fingerprint: str, description: dict[str, Any]) -> epath.Path:
  """The staging folder of job `fingerprint` under `work_dir`, cleared if it held another job."""
  folder = epath.Path(work_dir)
  job = folder / JOB_FILE
  if folder.exists():
    try:
      same = json.loads(job.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
      same = False
    if not same:
      folder.rmtree()
  (folder / "units").mkdir(parents=True, exist_ok=True)
  if not job.exists():
    _atomic_write(job, json.dumps({"fingerprint": fingerprint, **description}, indent=1).encode())
  return folder


def _paths(folder: epath.Path, index: int) -> tuple[epath.Path, epath.Path]:
  return folder / "units" / f"{index:06d}.bin", folder / "units" / f"{index:06d}.json"


def write_unit(folder: str | epath.Path, index: int, records: Iterable[packing.Record]
               ) -> list[dict[str, Any]]:
  """Stages unit `index`'s records as they come (a tar's images never all in memory): the bytes,
  then the fields (the commit). Returns the fields."""
  bin_path, json_path = _paths(epath.Path(folder), index)
  tmp = bin_path.parent / f".{bin_path.name}.tmp-{uuid.uuid4().hex}"
  fields, offset = [], 0
  try:
    with tmp.open("wb") as f:
      for record in records:
        entry = dataclasses.asdict(record)
        image = entry.pop("image")
        entry.update(offset=offset, length=len(image))
        f.write(image)
        offset += len(image)
        fields.append(entry)
    tmp.replace(bin_path)
  except BaseException:  # A truncated tar, a kill: no partial file is left behind.
    tmp.unlink(missing_ok=True)
    raise
  _atomic_write(json_path, json.dumps(fields, ensure_ascii=False).encode())
  return fields


def committed(folder: str | epath.Path) -> set[int]:
  """The indices of the units staged completely."""
  return {int(p.stem) for p in (epath.Path(folder) / "units").glob("*.json")
          if p.stem.isdigit()}


def read_fields(folder: str | epath.Path, index: int) -> list[packing.Record]:
  """Unit `index`'s records without their image bytes (image=b'', cheap: for counting)."""
  _, json_path = _paths(epath.Path(folder), index)
  return [_record(entry, b"") for entry in json.loads(json_path.read_text(encoding="utf-8"))]


def read_unit(folder: str | epath.Path, index: int) -> Iterator[packing.Record]:
  """Unit `index`'s records with their image bytes, one at a time."""
  bin_path, json_path = _paths(epath.Path(folder), index)
  entries = json.loads(json_path.read_text(encoding="utf-8"))
  with bin_path.open("rb") as f:
    for entry in entries:
      f.seek(entry["offset"])
      yield _record(entry, f.read(entry["length"]))


def _record(entry: dict[str, Any], image: bytes) -> packing.Record:
  fields = {k: v for k, v in entry.items() if k not in ("offset", "length")}
  fields["ordinal"] = tuple(fields["ordinal"])
  return packing.Record(**fields, image=image)


def pack_and_stage(unit: image_collections.Unit, folder: str, options: packing.PackOptions
                   ) -> tuple[int, list[tuple[str, str]]]:
  """A process pool's task: packs `unit` and stages it; returns (its item count, (reason,
  message) of each item: ('', where) for a usable one), for the progress bar and the skip rule.

  Raises:
    DataError: the unit is a truncated tar or not a tar.
  """
  fields = write_unit(folder, unit.index, packing.pack_unit(unit, options))
  return len(fields), [(f["reason"], f["message"] or f["where"]) for f in fields]


def pack_and_stage_task(task: tuple[image_collections.Unit, str, packing.PackOptions]
                        ) -> tuple[int, list[tuple[str, str]]]:
  """`pack_and_stage(*task)`: one argument, for `Pool.imap_unordered`. Lives here, not in the
  tool, so spawned workers import numpy and PIL only (not TensorFlow via TFDS)."""
  return pack_and_stage(*task)


class Selection:
  """Which staged records are kept and in which split (a pass over the staged fields), and the
  kept records of a split as (key, example)s (a pass over the staged bytes).

  Args:
    units: every unit of the job, all committed in `work`.
    first_n: skipped files named in the report.
    keep_duplicates: keep every usable record (else the first of each content hash).
    eval_fraction, seed: `packing.EvalDraw` for records without a split of their own.
  """

  def __init__(self, units: list[image_collections.Unit], work: epath.Path, first_n: int,
               keep_duplicates: bool, eval_fraction: float, seed: int):
    self.report = pack_report.Report(first_n)
    self.kept: dict[int, np.ndarray] = {}
    self.units_with: dict[str, set[int]] = {packing.TRAIN: set(), packing.VALIDATION: set()}
    dedup, low = packing.Dedup(), None
    for unit in units:
      fields = read_fields(work, unit.index)
      keep = np.zeros(len(fields), bool)
      for i, record in enumerate(fields):
        self.report.add_record(record)
        keep[i] = not record.reason and (keep_duplicates or dedup.keep(record))
        if keep[i] and not record.split:
          h = packing.eval_hash(record.key, seed)
          low = h if low is None else min(low, h)
      self.kept[unit.index] = keep
    self.draw = packing.EvalDraw(eval_fraction, seed, low)
    for unit in units:
      for record, keep in zip(read_fields(work, unit.index), self.kept[unit.index]):
        if keep:
          self.units_with[self.draw.split_of(record)].add(unit.index)

  def examples(self, split: str, units: list[image_collections.Unit], work: epath.Path):
    """The (key, example)s of `split`, counted into the report as TFDS consumes them."""
    for unit in units:
      if unit.index not in self.units_with[split]:
        continue
      for record, keep in zip(read_unit(work, unit.index), self.kept[unit.index]):
        if keep and self.draw.split_of(record) == split:
          self.report.add_kept(record, split)
          yield packing.example(record)
