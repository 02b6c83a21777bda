"""Test-only fault injection into a run's train batches; nothing in a config reaches it.

  VAE_SCALE_CORRUPT_EXAMPLES=KIND:FIRST-LAST[,KIND:FIRST-LAST ...]

makes every train batch that holds one of the global examples FIRST..LAST (the global data
position's numbering, so the same examples on any process layout) arrive corrupted: KIND 'nan'
turns its images to NaN (a non-finite streak), 'spike' multiplies them by 50 (a finite loss spike).
The guard's tests use it: after a rollback past the window, the corrupted examples never come back.
(SIGTERM at a chosen moment is `preemption`'s VAE_SCALE_SIGTERM_AT.)
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

ENV = "VAE_SCALE_CORRUPT_EXAMPLES"
KINDS = {"nan": lambda x: np.full_like(x, np.nan), "spike": lambda x: x * 50.0}
Corrupt = Callable[[dict[str, np.ndarray], int, int], dict[str, np.ndarray]]


def from_env(environ: dict[str, str] | None = None) -> Corrupt | None:
  """The corruption `ENV` asks for, or None (the normal case).

  Returns:
    f(local batch, first global example of the batch, one past its last) -> the batch.
  Raises:
    ValueError: a malformed `ENV` (a test's mistake).
  """
  spec = (os.environ if environ is None else environ).get(ENV, "")
  if not spec:
    return None
  windows = []
  for part in spec.split(","):
    kind, _, span = part.partition(":")
    first, _, last = span.partition("-")
    if kind not in KINDS or not first.isdigit() or not last.isdigit():
      raise ValueError(f"{ENV}={spec!r}: use KIND:FIRST-LAST with KIND one of {sorted(KINDS)}")
    windows.append((KINDS[kind], int(first), int(last)))

  def corrupt(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    for fn, first, last in windows:
      if start <= last and first < stop:
        batch = dict(batch, image=fn(batch["image"]))
    return batch

  return corrupt
