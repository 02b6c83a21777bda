"""What a prepare did, as counts: images listed, kept per split, skipped by reason, duplicates.

`Report` is a mergeable accumulator (a Beam CombineFn wraps it), fed every record and every kept
record in any order; its result is the same dict either way, because the first `first_n` skipped
files are chosen by their global order, not by arrival. Written as `prepare_report.json` next to
the dataset's `dataset_info.json`.
"""

from __future__ import annotations

import collections
import heapq
from typing import Any

from vae_scale.data import packing

REPORT_FILE = "prepare_report.json"


class Report:
  """Counts over records; `merge` combines two partial reports (order-free)."""

  def __init__(self, first_n: int = 20):
    self.first_n = first_n
    self.listed = 0
    self.usable = 0
    self.skipped: collections.Counter[str] = collections.Counter()
    self.first_skipped: list[tuple[tuple[int, int], str, str, str]] = []  # Max-heap by ordinal.
    self.kept: collections.Counter[str] = collections.Counter()
    self.resized = 0
    self.with_caption = 0
    self.source_bytes = 0
    self.stored_bytes = 0

  def add_record(self, record: packing.Record) -> None:
    """Counts one record of the collection (usable or not)."""
    self.listed += 1
    if not record.reason:
      self.usable += 1
      return
    self.skipped[record.reason] += 1
    entry = (tuple(-i for i in record.ordinal), record.where, record.reason, record.message)
    if len(self.first_skipped) < self.first_n:
      heapq.heappush(self.first_skipped, entry)
    elif entry > self.first_skipped[0]:  # An earlier ordinal than the latest one kept.
      heapq.heapreplace(self.first_skipped, entry)

  def add_kept(self, record: packing.Record, split: str) -> None:
    """Counts one record written to `split` (usable, first of its content)."""
    self.kept[split] += 1
    self.resized += int(record.resized)
    self.with_caption += int(bool(record.caption))
    self.source_bytes += record.source_bytes
    self.stored_bytes += len(record.image)

  def merge(self, other: "Report") -> "Report":
    self.listed += other.listed
    self.usable += other.usable
    self.skipped.update(other.skipped)
    for entry in other.first_skipped:
      if len(self.first_skipped) < self.first_n:
        heapq.heappush(self.first_skipped, entry)
      elif entry > self.first_skipped[0]:
        heapq.heapreplace(self.first_skipped, entry)
    self.kept.update(other.kept)
    self.resized += other.resized
    self.with_caption += other.with_caption
    self.source_bytes += other.source_bytes
    self.stored_bytes += other.stored_bytes
    return self

  def result(self, **fields: Any) -> dict[str, Any]:
    """The report as JSON-ready data; `fields` (sources, options, fingerprint) go first."""
    kept_total = sum(self.kept.values())
    first = sorted(self.first_skipped, reverse=True)  # Ascending ordinal.
    return {
        **fields,
        "images_listed": self.listed,
        "images_kept": kept_total,
        "kept_by_split": dict(sorted(self.kept.items())),
        "duplicates_dropped": self.usable - kept_total,
        "skipped": sum(self.skipped.values()),
        "skipped_by_reason": dict(sorted(self.skipped.items())),
        "first_skipped": [{"path": where, "reason": reason, "message": message}
                          for _, where, reason, message in first],
        "resized": self.resized,
        "kept_original_bytes": kept_total - self.resized,
        "with_caption": self.with_caption,
        "source_bytes_of_kept": self.source_bytes,
        "stored_image_bytes": self.stored_bytes,
    }
