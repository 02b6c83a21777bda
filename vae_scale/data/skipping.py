"""Skipping unreadable files, counting them, and stopping when nearly nothing is usable.

A decode map turns a file that can't be used into `{'error': 'path: reason'}`; `SkipBad` drops those
records and counts them into the next good example's `skipped` field, because decoding happens in
Grain worker processes, out of reach of any counter in the trainer. The batch's sum of `skipped` is
the files passed over while collecting it (the `data/skipped` metric). A reader that finds nearly
nothing usable stops the run with a DataError (`SkipPolicy`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import logging

from vae_scale.errors import DataError

SKIPPED_KEY = "skipped"  # Per-example (and per-batch) count of unreadable files; not for devices.


@dataclasses.dataclass(frozen=True)
class SkipPolicy:
  """When skipping unreadable files turns into stopping the run (per reader: each Grain worker, or
  the trainer process when data.num_workers == 0, judges the files it read itself).

  Stop once at least `min_attempts` files were tried and `max_bad_fraction` of all tried so far
  were bad (a wrong path, a folder of non-images: caught within the first few hundred files), or
  after `max_consecutive_bad` bad files in a row (storage that disappears mid-run). In shuffled
  order neither fires by chance on data that is mostly good: a folder 50% bad reaches 90% of 100
  with probability ~1e-17 and 1000 in a row with probability 2^-1000.
  """

  min_attempts: int = 100
  max_bad_fraction: float = 0.9
  max_consecutive_bad: int = 1000
  log_first: int = 5  # Bad files named in the log (and in the error) per reader.
  log_every: int = 1000  # Then one summary line per this many bad files.


class _SkipBadIterator(grain.DatasetIterator):
  """Passes good examples on with the count of bad ones skipped just before each."""

  def __init__(self, parent: grain.DatasetIterator, policy: SkipPolicy):
    super().__init__(parent)
    self._policy = policy
    self._tried = self._bad = self._in_a_row = self._pending = 0
    self._first_errors: list[str] = []

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      element = next(self._parent)
      self._tried += 1
      if "error" not in element:
        out = {"image": element["image"], SKIPPED_KEY: np.int32(self._pending)}
        self._in_a_row = self._pending = 0
        return out
      self._bad += 1
      self._in_a_row += 1
      self._pending += 1
      self._note(element["error"])

  def _note(self, error: str) -> None:
    p = self._policy
    if len(self._first_errors) < p.log_first:
      self._first_errors.append(error)
      logging.warning("Skipping an unreadable image (%d of %d tried so far): %s", self._bad,
                      self._tried, error)
    elif self._bad % p.log_every == 0:
      logging.warning("Skipped %d unreadable images of %d tried so far; latest: %s", self._bad,
                      self._tried, error)
    too_many = self._tried >= p.min_attempts and self._bad >= p.max_bad_fraction * self._tried
    if too_many or self._in_a_row >= p.max_consecutive_bad:
      why = (f"{self._bad} of the {self._tried} files tried could not be used "
             f"(>= {p.max_bad_fraction:.0%})" if too_many else
             f"the last {self._in_a_row} files tried in a row could not be used")
      raise DataError(
          f"Stopping: {why}. The data is not what config.data points at (wrong path? not images? "
          f"storage gone?). First failures: {'; '.join(self._first_errors)}")

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "tried": self._tried, "bad": self._bad,
            "in_a_row": self._in_a_row, "pending": self._pending}

  def set_state(self, state: dict[str, Any]) -> None:
    if "parent" not in state:
      raise DataError(
          "The data iterator checkpoint does not match this input pipeline (state keys "
          f"{sorted(state)[:4]}): was config.data.num_workers switched between 0 and > 0, or the "
          "data source changed, since it was written? Rerun with the data settings of the run "
          "that wrote it, or restart the data iterator.")
    self._parent.set_state(state["parent"])
    self._tried, self._bad = int(state["tried"]), int(state["bad"])
    self._in_a_row, self._pending = int(state["in_a_row"]), int(state["pending"])


class SkipBad(grain.IterDataset):
  """Drops {'error': ...} records, counting them into the next good example's 'skipped'."""

  def __init__(self, parent: grain.IterDataset, policy: SkipPolicy):
    super().__init__(parent)
    self._policy = policy

  def __iter__(self) -> _SkipBadIterator:
    return _SkipBadIterator(self._parent.__iter__(), self._policy)

  def __str__(self) -> str:
    return f"SkipBad({self._policy})"
