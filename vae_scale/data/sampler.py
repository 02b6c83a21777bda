"""The global example order and each process's place in it: index-based, elastic sampling.

Every run reads one endless global sequence of examples, the same for any number of processes,
Grain workers or devices:

  order        global index g -> source index `global_order(n, seed)[g]`: the seeded shuffle of
               the source, repeated. Grain draws a new permutation for every epoch (epoch
               e = g // n is permuted with the shuffle's seed + e), and finds any g in O(1).
  batches      global batch s of a stream that starts at global index `start` holds
               g in [start + s*B, start + (s+1)*B); the process whose devices hold rows `rows`
               of the global array (`sharding.process_rows`; [p*b, (p+1)*b) with b = B / P on a
               mesh that lists devices process by process) loads g = start + s*B + rows[i] as
               its local row i. So the assembled global batch is the same for any P.
  crops        the train crop of g is drawn from np.random.default_rng([seed, g, k]): it depends
               on the example, never on the process or worker that decodes it.
  bad files    an unreadable element at g is replaced by the first readable of the elements at
               g + k*n, k = 1, 2, ... (the same place of the following epochs, each a fresh
               permutation): deterministic and the same in every layout. k is the example's
               'skipped' count.

The stream's position is thus one number, the global examples consumed: step*B after `step`
steps of a constant global batch B. A checkpoint stores it as a small JSON record
(`DataPosition.record`) instead of per-process iterator state, and a run resumes from it on any
process count whose share divides the global batch, any worker count and any device count; after
a change of global batch it continues from the same example.

Why our own sampler rather than Grain's iterator state or `grain.experimental.ElasticIterator`:
Grain's checkpoint is one state per process (and per worker) and restores only on the same
counts; ElasticIterator restores across shardings but does not allow `filter`, which is how a
pipeline drops unreadable files, and a layout-independent substitute for an unreadable file
needs the global index anyway. A position derived from the step needs no per-process or
per-worker state at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from vae_scale.errors import DataError

POSITION_FORMAT = "vae_scale.data_position"
POSITION_VERSION = 1
# Local slots of an "endless" stream: 2**62 examples outlast any run by far.
ENDLESS = 2**62


def global_order(num_examples: int, seed: int) -> grain.MapDataset:
  """Global index -> source index: the seeded shuffle of range(num_examples), a new permutation
  every epoch, endless. Random access: `order[g]`."""
  return grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat()


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """Rows [p*b, (p+1)*b) of each global batch: process p's share on a mesh that lists the
  devices process by process (the default; `sharding.process_rows` reads a mesh's own)."""
  b = global_batch_size // process_count
  return np.arange(process_index * b, (process_index + 1) * b)


@dataclasses.dataclass(frozen=True)
class Slots:
  """A process's local example slots -> global indices.

  Attributes:
    start: the global index where global batch 0 of this stream starts (the resume position).
    global_batch_size: B.
    rows: the rows of each global batch this process loads, in local order ([b] ints in [0, B)).
  """

  start: int
  global_batch_size: int
  rows: tuple[int, ...]

  def __post_init__(self):
    if self.start < 0:
      raise ValueError(f"start must be >= 0, got {self.start}")
    if not self.rows or min(self.rows) < 0 or max(self.rows) >= self.global_batch_size or len(
        set(self.rows)) != len(self.rows):
      raise ValueError(f"rows {self.rows} are not distinct rows of a global batch of "
                       f"{self.global_batch_size}")

  @classmethod
  def of(cls, start: int, global_batch_size: int, rows: Sequence[int]) -> "Slots":
    return cls(int(start), int(global_batch_size), tuple(int(r) for r in rows))

  def __call__(self, slot: int) -> int:
    """The global index of local slot `slot` (local batch slot // b, row slot % b)."""
    step, i = divmod(int(slot), len(self.rows))
    return self.start + step * self.global_batch_size + self.rows[i]


def alternate(g: int, k: int, num_examples: int) -> int:
  """The global index whose element stands in for the k-th unreadable try at g (k=0: g)."""
  return g + k * num_examples


def crop_rng(seed: int, g: int, k: int) -> np.random.Generator:
  """The random stream of global example g's train view (its k-th substitute for k > 0)."""
  return np.random.default_rng([seed, g, k])


# --------------------------------------------------------------------------- position


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where a run's train stream stands: `global_examples` consumed after `step` steps; every later
  step consumes `global_batch_size` more.

  Attributes:
    step: a step at which the position is known (the restored step, or 0).
    global_examples: global examples consumed before `step` (the stream's start index).
    global_batch_size: the run's current global batch.
    source: repr() of the train source (recorded to explain a changed order; not compared).
    seed: config.seed (the order's seed; likewise recorded).
  """

  step: int
  global_examples: int
  global_batch_size: int
  source: str = ""
  seed: int = 0

  def at(self, step: int) -> int:
    """Global examples consumed after `step` steps."""
    return self.global_examples + (int(step) - self.step) * self.global_batch_size

  def record(self, step: int) -> dict[str, Any]:
    """The JSON record a checkpoint of `step` stores as its `data` item."""
    return {"format": POSITION_FORMAT, "version": POSITION_VERSION,
            "global_examples": self.at(step), "global_batch_size": self.global_batch_size,
            "step": int(step), "source": self.source, "seed": self.seed}


def examples_from_record(record: Any, where: str) -> int:
  """The global examples consumed, from a `DataPosition.record`.

  Raises:
    DataError: a record of a newer format version (written by a newer vae_scale).
    ValueError: not a position record at all (a damaged item).
  """
  if not isinstance(record, dict) or record.get("format") != POSITION_FORMAT:
    raise ValueError(f"{where} is not a {POSITION_FORMAT} record")
  if record.get("version") != POSITION_VERSION:
    raise DataError(f"{where} holds a data position of format version {record.get('version')}; "
                    f"this vae_scale reads version {POSITION_VERSION}: resume with the vae_scale "
                    "version that wrote it (or a newer one)")
  examples = record.get("global_examples")
  if not isinstance(examples, int) or examples < 0:
    raise ValueError(f"{where}: global_examples={examples!r} is not a count")
  return examples
