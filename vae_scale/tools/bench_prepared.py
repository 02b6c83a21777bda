"""`bench data --prepared`: the same images as a folder and as a prepared (packed) TFDS dataset.

Packs the benchmark's folder with `vae_scale.prepare` on one process, timing it (images per
CPU-second of the per-image work and of TFDS's write: the prepare's cost per core), measures the
storage before and after (objects and bytes, and what they come to per million images), and gives
`bench.run_data` the config of a train pipeline reading the packed dataset, timed side by side
with the folder's.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
from tensorflow_datasets.core.utils import shard_utils

from vae_scale.data import transforms
from vae_scale.data import packed_dataset
from vae_scale.tools import prepare as prepare_lib

MILLION = 1_000_000


def _storage(paths: list[str]) -> dict[str, float]:
  sizes = [os.path.getsize(p) for p in paths]
  return {"objects": len(sizes), "bytes": float(sum(sizes))}


def prepare_folder(folder: str, files: list[str], out: str, image_size: int) -> dict[str, Any]:
  """Packs `folder` into `out/bench/1.0.0` on one process; returns the figures and the path."""
  start_cpu, start = time.process_time(), time.perf_counter()
  report = prepare_lib.prepare(prepare_lib.PrepareOptions(
      src=folder, out=out, name="bench", eval_fraction=0.0, num_workers=1, image_size=image_size,
      overwrite=True))
  cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
  version = packed_dataset.version_dir(out, "bench")
  kept = report["images_kept"]
  before = _storage(files)
  after = _storage([os.fspath(p) for p in version.iterdir()])
  shards = [p for p in version.iterdir() if ".array_record-" in p.name]
  per_image = after["bytes"] / kept
  # At a million images TFDS's default shard sizing (64 MiB to 1 GiB) decides the object count.
  million_shards = shard_utils.ShardConfig().get_number_shards(int(per_image * MILLION), MILLION)
  return {
      "dataset": os.fspath(version.parent),
      "images": kept,
      "resized": report["resized"],
      "pack_images_per_cpu_s": report["images_packed"] / max(report["pack_seconds"], 1e-9),
      "prepare_images_per_cpu_s": kept / cpu,
      "prepare_wall_s": wall,
      "prepare_cpu_s": cpu,
      "hours_per_million_per_core": MILLION / (kept / cpu) / 3600,
      "before": {**before, "objects_per_million": MILLION / len(files) * before["objects"],
                 "bytes_per_million": before["bytes"] / len(files) * MILLION},
      "after": {**after, "shards": len(shards), "objects_per_million": million_shards + 3,
                "bytes_per_million": per_image * MILLION},
      "bytes_ratio": (before["bytes"] / len(files)) / per_image,
  }


def pipeline_config(dataset: str, image_size: int, batch_size: int, workers: int
                    ) -> ml_collections.ConfigDict:
  """The fields of a config the train pipeline reads, for the packed dataset at DATA_DIR/NAME."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = image_size
  config.global_batch_size = batch_size
  config.data = ml_collections.ConfigDict(dict(
      source="tfds", tfds_name=dataset, tfds_data_dir="", train_split="train", image_key="image",
      num_workers=workers, prefetch_batches=4, max_pixels=transforms.DEFAULT_MAX_PIXELS))
  return config
