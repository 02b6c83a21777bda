"""Grain chains: host-local numpy batches of images in [-1, 1]. Never touches devices.

Train (endless, shuffled, augmented, elastic; see `sampler` for the order and why):

  local slot j -> global index g (`sampler.Slots`: this process's rows of each global batch) ->
  source element of the global order (an unreadable one replaced by a substitute, counted) ->
  decode + crop (randomness from g) -> batch (uint8 to float32) [-> worker processes]

A stream starts at any global index (`start`, the resume position), and the global batches
assembled from all processes' streams are the same example for example for any process count,
worker count or device count. Every train batch is
`{'image': float32 [b, H, W, 3] in [-1, 1], 'skipped': int32 [b]}` (see `skipping`); pop
'skipped' before the batch goes to the devices.

Eval (the first `num_eval_images` examples, center crops, fixed order): every process yields the
same number of batches `{'image': float32 [b, H, W, 3], 'weight': float32 [b]}`, a share cut short
(by its size or by unreadable files) padded with weight-0 images, so a weighted mean counts each
held-out image exactly once.

Encode (every image of a split once, in order, with its index): `share_dataset`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging
from grain.python import SharedMemoryArray

from vae_scale.config import schema
from vae_scale.data import transforms
from vae_scale.data import sampler
from vae_scale.data import skipping
from vae_scale.data import sources
from vae_scale.errors import DataError


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """The share of a global batch each process loads (a ConfigError if it doesn't divide)."""
  schema.check_batch(global_batch_size, num_processes=process_count)
  return global_batch_size // process_count


# --------------------------------------------------------------------------- maps


def _load(element: Any, max_pixels: int, min_size: int | None):
  """A source element (path, URL, encoded bytes or decoded array) as an RGB image."""
  if isinstance(element, (str, bytes, os.PathLike)):
    return transforms.load_image(element, max_pixels, min_size=min_size)
  return transforms.as_rgb_array(element)


def _reduced_jpeg_decode(config: ml_collections.ConfigDict) -> bool:
  # Decoding large JPEGs at 1/2, 1/4 or 1/8 scale (never below image_size) is several times
  # faster and differs from a full decode by less than bilinear vs bicubic resizing does.
  return bool(config.data.get("reduced_jpeg_decode", True))


def _describe(element: Any, error: Exception) -> str:
  if isinstance(error, transforms.BadImageError):
    return str(error)
  where = element if isinstance(element, (str, os.PathLike)) else type(element).__name__
  return f"{where}: {type(error).__name__}: {error}"


class _TrainExample:
  """Local slot -> the LDM train view (uint8) of the example at its global index.

  An unreadable element is replaced by the first readable of `sampler.alternate(g, k, n)`,
  k = 1, 2, ...; k is the example's 'skipped' count. `BadFiles` stops the run when nearly
  nothing is readable. Returns {'image': uint8 [size, size, 3], 'skipped': int32}.
  """

  def __init__(self, source: Any, slots: sampler.Slots, seed: int, size: int, max_pixels: int,
               reduced_jpeg_decode: bool, policy: skipping.SkipPolicy):
    self._source, self._slots, self._seed = source, slots, seed
    self._order = sampler.global_order(len(source), seed)
    self._size, self._max_pixels = size, max_pixels
    self._min_size = size if reduced_jpeg_decode else None
    self._bad = skipping.BadFiles(policy)

  def __call__(self, slot: int) -> dict[str, Any]:
    g, n = self._slots(slot), len(self._source)
    for k in range(self._bad.policy.max_consecutive_bad + 1):
      element = self._source[self._order[sampler.alternate(g, k, n)]]
      try:
        image = _load(element, self._max_pixels, self._min_size)
        # uint8 until batching: `_Collate` writes floats once, straight into the batch.
        crop = transforms.train_crop(image, self._size, sampler.crop_rng(self._seed, g, k))
      except Exception as e:  # pylint: disable=broad-except
        # Real folders hold files that break decoders in every way; one must never stop a worker.
        self._bad.failed(_describe(element, e), tries_for_example=k + 1)
        continue
      self._bad.good()
      return {"image": crop, skipping.SKIPPED_KEY: np.int32(k)}
    raise AssertionError("unreachable: BadFiles stops after max_consecutive_bad failures")


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """Decode + center crop, or None for a file that can't be used."""

  size: int
  max_pixels: int
  reduced_jpeg_decode: bool = True

  def __call__(self, element: Any) -> dict[str, np.ndarray] | None:
    try:
      image = _load(element, self.max_pixels, self.size if self.reduced_jpeg_decode else None)
      return {"image": transforms.eval_view(image, self.size)}
    except Exception as e:  # pylint: disable=broad-except
      logging.log_every_n(logging.WARNING, "Skipping unusable eval image: %s", 100,
                          _describe(element, e))
      return None


def _not_none(x) -> bool:
  return x is not None


class _Collate:
  """Stacks the examples' uint8 crops into a batch: float32 in [-1, 1], each crop converted
  straight into its slot, or (`to_float=False`) uint8. In a Grain worker the batch is allocated in
  shared memory, so it reaches the trainer process without another copy."""

  def __init__(self, to_float: bool = True):
    self._to_float = to_float
    self._shared_memory = False

  def enable_shared_memory_output(self) -> None:  # Grain calls this inside worker processes.
    self._shared_memory = True

  def __call__(self, elements: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    shape = (len(elements),) + elements[0]["image"].shape
    dtype = np.float32 if self._to_float else np.uint8
    images = (SharedMemoryArray(shape, dtype=dtype) if self._shared_memory else
              np.empty(shape, dtype))
    for i, e in enumerate(elements):
      if self._to_float:
        transforms.to_signed_float(e["image"], out=images[i])
      else:
        images[i] = e["image"]
    skipped = np.fromiter((e[skipping.SKIPPED_KEY] for e in elements), np.int32, len(elements))
    return {"image": images, skipping.SKIPPED_KEY: skipped}


def _batch_to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A uint8 batch from the workers as float32 [-1, 1] in the trainer process's own memory."""
  return {"image": transforms.to_signed_float(batch["image"]), skipping.SKIPPED_KEY: batch[skipping.SKIPPED_KEY]}


# --------------------------------------------------------------------------- train


class _SharedMemoryBatches(grain.IterDataset):
  """Marks the batches as shared-memory capable for `mp_prefetch`: the batch is a MapDataset step
  here (so workers split the stream by whole batches), and Grain only asks the top dataset."""

  def __init__(self, parent: grain.IterDataset, collate: "_Collate"):
    super().__init__(parent)
    self._collate = collate

  def __iter__(self) -> grain.DatasetIterator:
    return self._parent.__iter__()

  def enable_shared_memory_output(self) -> None:
    self._collate.enable_shared_memory_output()

  def __str__(self) -> str:
    return "SharedMemoryBatches"


def create_train_dataset(config: ml_collections.ConfigDict, process_index: int,
                         process_count: int, source=None, *, workdir: str | None = None,
                         skip_policy: skipping.SkipPolicy = skipping.SkipPolicy(),
                         start: int = 0, rows: Sequence[int] | None = None) -> grain.IterDataset:
  """The endless, shuffled, augmented train stream of this process, from global example `start`.

  Args:
    config: the run config.
    process_index, process_count: this process; it loads b = global_batch_size // process_count
      examples of each global batch.
    source: overrides `make_source(config, 'train')`.
    workdir: caches folder listings there (see `list_image_files`).
    skip_policy: when unreadable files stop the run.
    start: the global index where this stream's first global batch starts: 0 for a fresh run,
      the checkpoint's data position (`sampler.DataPosition`) for a resumed one.
    rows: the rows of each global batch this process loads, in local order (the train loop
      passes `sharding.process_rows(mesh, ...)`); default rows [p*b, (p+1)*b).
  Returns:
    Batches {'image': float32 [b, H, W, 3] in [-1, 1], 'skipped': int32 [b]}: batch s holds
    global examples start + s*global_batch_size + rows; 'skipped'.sum() is the number of
    unreadable files passed over while filling it. The same for any num_workers.
  """
  source = source if source is not None else sources.make_source(config, "train", workdir)
  if len(source) == 0:
    raise DataError(f"the train source {source!r} is empty")
  batch_size = per_process_batch_size(config.global_batch_size, process_count)
  rows = (sampler.process_rows(config.global_batch_size, process_index, process_count)
          if rows is None else rows)
  if len(rows) != batch_size:
    raise ValueError(f"{len(rows)} rows for a per-process batch of {batch_size}")
  slots = sampler.Slots.of(start, config.global_batch_size, rows)
  ds = grain.MapDataset.range(sampler.ENDLESS).map(_TrainExample(
      source, slots, config.seed, config.image_size, config.data.max_pixels,
      _reduced_jpeg_decode(config), skip_policy))
  workers = config.data.num_workers
  if workers == 0:
    # Threads overlap the decodes of one batch (PIL releases the GIL) in the trainer process.
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=4, prefetch_buffer_size=config.data.prefetch_batches * batch_size))
    return it.batch(batch_size, drop_remainder=True, batch_fn=_Collate())
  # Batched before the workers split the stream, so worker i makes whole batches i, i+W, ... and
  # mp_prefetch's round robin restores their order: the same batches as without workers. Each
  # worker decodes on its own thread (one worker per core). Workers batch straight into shared
  # memory, in uint8: Grain's fresh segment per batch costs ~5x more per byte than private
  # memory, so only a quarter of the bytes cross it, and a thread of the trainer process (numpy
  # releases the GIL) converts them to float32 off the training loop's thread.
  collate = _Collate(to_float=False)
  it = ds.batch(batch_size, drop_remainder=True, batch_fn=collate).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=config.data.prefetch_batches))
  it = _SharedMemoryBatches(it, collate).mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=config.data.prefetch_batches))
  it = it.map(_batch_to_float)
  return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)


# --------------------------------------------------------------------------- eval


def num_eval_batches(config: ml_collections.ConfigDict, process_count: int) -> int:
  """Batches every process runs for `num_eval_images` held-out images (the same on all)."""
  per_process = per_process_batch_size(config.global_batch_size, process_count)
  share = -(-config.num_eval_images // process_count)
  return max(1, -(-share // per_process))


def create_eval_dataset(config: ml_collections.ConfigDict, process_index: int,
                        process_count: int, source=None, *,
                        workdir: str | None = None) -> grain.MapDataset:
  """This process's share of the held-out set: the first `num_eval_images` examples (the source
  repeated if it is shorter), center crops, fixed order.

  Elements are {'image': float32 [H, W, 3] in [-1, 1]}, or None for an unreadable file (dropped
  and padded by `eval_batches`).
  """
  source = source if source is not None else sources.make_source(config, "eval", workdir)
  per_process_batch_size(config.global_batch_size, process_count)
  n = config.num_eval_images
  ds = grain.MapDataset.source(source)
  if len(ds) < n:
    ds = ds.repeat(-(-n // len(ds)))
  ds = ds[:n][process_index::process_count]
  return ds.map(_EvalExample(config.image_size, config.data.max_pixels,
                             _reduced_jpeg_decode(config)))


def eval_batches(config: ml_collections.ConfigDict, dataset: grain.MapDataset,
                 process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `num_eval_batches` per-process batches {'image': [b, H, W, 3], 'weight': [b]}.

  Weight 1 marks a held-out image, 0 the padding of a short share, so the weighted mean over all
  processes counts every readable held-out image once. The same batches every time.
  """
  b = per_process_batch_size(config.global_batch_size, process_count)
  it = iter(dataset.filter(_not_none).to_iter_dataset(grain.ReadOptions(num_threads=4)).batch(
      b, drop_remainder=False))
  shape = (b, config.image_size, config.image_size, 3)
  for _ in range(num_eval_batches(config, process_count)):
    got = next(it, None)
    n = 0 if got is None else len(got["image"])
    image = np.zeros(shape, np.float32)
    if n:
      image[:n] = got["image"]
    weight = np.zeros((b,), np.float32)
    weight[:n] = 1.0
    yield {"image": image, "weight": weight}


# --------------------------------------------------------------------------- encode


@dataclasses.dataclass(frozen=True)
class _LoadIndexed:
  """(index, element) -> {'image': center crop in [-1, 1], 'index'}, or None if unreadable."""

  size: int
  max_pixels: int
  reduced_jpeg_decode: bool = True

  def __call__(self, index: int, element: Any) -> dict[str, np.ndarray] | None:
    try:
      # A JPEG may decode at 1/2..1/8 scale, never below the size it is resized to anyway.
      image = _load(element, self.max_pixels, self.size if self.reduced_jpeg_decode else None)
      return {"image": transforms.eval_view(image, self.size), "index": np.int64(index)}
    except Exception as e:  # pylint: disable=broad-except
      # A broken file in a folder of millions is skipped (and logged), never fatal.
      logging.warning("Skipping unusable image %d: %s", index, _describe(element, e))
      return None


def share_dataset(config: ml_collections.ConfigDict, source, process_index: int,
                  process_count: int, batch_size: int) -> grain.IterDataset:
  """This process's share of `source`, in order, as batches {'image': float32 [n, H, W, 3] in
  [-1, 1], 'index': int64 [n]} with n = batch_size (the last one shorter)."""
  ds = grain.MapDataset.source(source).map_with_index(_LoadIndexed(
      config.image_size, config.data.max_pixels, _reduced_jpeg_decode(config)))
  ds = ds[process_index::process_count].filter(_not_none)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if config.data.num_workers else 8))
  it = it.batch(batch_size, drop_remainder=False)
  if config.data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it
