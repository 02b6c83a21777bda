"""Unreadable files: replaced by a deterministic substitute, counted, and a stop when nearly nothing
is usable.

The train map decodes the element at global index g; when that fails it tries the stand-ins
`sampler.alternate(g, k, n)`, k = 1, 2, ... until one decodes, and records k in the example's
`skipped` field (decoding happens in Grain worker processes, out of reach of any counter in the
trainer). The substitute depends only on g, so every layout of processes and workers reads the
same examples and counts the same files. The batch's sum of `skipped` is the files passed over
while filling it (the `data/skipped` metric). A reader that finds nearly nothing usable stops the
run with a DataError (`SkipPolicy`, judged by `BadFiles`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from absl import logging

from vae_scale.errors import DataError

SKIPPED_KEY = "skipped"  # Per-example (and per-batch) count of unreadable files; not for devices.


@dataclasses.dataclass(frozen=True)
class SkipPolicy:
  """When unreadable files turn into stopping the run (per reader: each Grain worker, or the
  trainer process when data.num_workers == 0, judges the files it read itself, substitutes
  included).

  Stop once at least `min_attempts` files were tried and `max_bad_fraction` of all tried so far
  were bad (a wrong path, a folder of non-images: caught within the first few hundred files), or
  after `max_consecutive_bad` bad files in a row (storage that disappears mid-run), or when one
  example's `max_consecutive_bad` substitutes are all unreadable. In shuffled order none fires by
  chance on data that is mostly good: a folder 50% bad reaches 90% of 100 with probability ~1e-17
  and 1000 in a row with probability 2^-1000.
  """

  min_attempts: int = 100
  max_bad_fraction: float = 0.9
  max_consecutive_bad: int = 1000
  log_first: int = 5  # Bad files named in the log (and in the error) per reader.
  log_every: int = 1000  # Then one summary line per this many bad files.


class BadFiles:
  """One reader's count of the files it tried; raises DataError when `policy` says stop.

  Thread-safe (the trainer process decodes on several threads); each Grain worker process gets
  its own copy (counts start at 0 there).
  """

  def __init__(self, policy: SkipPolicy = SkipPolicy()):
    self.policy = policy
    self._lock = threading.Lock()
    self.tried = self.bad = self.in_a_row = 0
    self._first_errors: list[str] = []

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def good(self) -> None:
    with self._lock:
      self.tried += 1
      self.in_a_row = 0

  def failed(self, error: str, tries_for_example: int) -> None:
    """Counts one unreadable file; `tries_for_example`: how many files this example has tried."""
    p = self.policy
    with self._lock:
      self.tried += 1
      self.bad += 1
      self.in_a_row += 1
      tried, bad, in_a_row = self.tried, self.bad, self.in_a_row
      if len(self._first_errors) < p.log_first:
        self._first_errors.append(error)
        logging.warning("Skipping an unreadable image (%d of %d tried so far): %s", bad, tried,
                        error)
      elif bad % p.log_every == 0:
        logging.warning("Skipped %d unreadable images of %d tried so far; latest: %s", bad, tried,
                        error)
      first = "; ".join(self._first_errors)
    too_many = tried >= p.min_attempts and bad >= p.max_bad_fraction * tried
    in_a_row = max(in_a_row, tries_for_example)
    if too_many or in_a_row >= p.max_consecutive_bad:
      why = (f"{bad} of the {tried} files tried could not be used "
             f"(>= {p.max_bad_fraction:.0%})" if too_many else
             f"the last {in_a_row} files tried in a row could not be used")
      raise DataError(
          f"Stopping: {why}. The data is not what config.data points at (wrong path? not images? "
          f"storage gone?). First failures: {first}")
