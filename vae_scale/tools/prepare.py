r"""Packs an image collection once into a TFDS dataset (ArrayRecord) that any number of hosts train from.

  python -m vae_scale.prepare --src=SRC --out=DATA_DIR --name=NAME [--eval_src=SRC |
      --eval_fraction=0.01] [--max_side=512] [--num_workers=N] [--overwrite] \
      [--beam_pipeline_options=runner=DirectRunner,direct_num_workers=8]

SRC: a folder or glob of images, a manifest .txt, or webdataset .tar shards (a glob or a brace
list such as 'gs://b/laion/{00000..00999}.tar'), local or gs://. Each image is decoded once:
unusable files are skipped (the trainer's rules) and counted, images whose shorter side exceeds
--max_side are shrunk to it and stored as JPEG quality 95, smaller ones keep their bytes, exact
duplicates keep the first. Then TFDS's own writer writes DATA_DIR/NAME/1.0.0 (splits 'train' and
'validation', with prepare_report.json). Train on it with
`--config.data.source=tfds --config.data.tfds_name=DATA_DIR/NAME`.

Two stages on one machine: the per-image work on a process pool, unit by unit (chunks of files,
or one tar each), each unit committed to a work folder as it finishes; then TFDS writes the
dataset from the staged units. A rerun of an interrupted command packs only the units not yet
committed, and the dataset only ever appears whole (see `packed_dataset`). With
--beam_pipeline_options the same work runs as one Apache Beam pipeline instead (`packed_beam`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
import time
from typing import Any

from absl import logging
from etils import epath
from tqdm import tqdm

from vae_scale.data import transforms
from vae_scale.data import image_collections
from vae_scale.data import packed_dataset
from vae_scale.data import packing
from vae_scale.data import skipping
from vae_scale.data import staging
from vae_scale.errors import ConfigError
from vae_scale.errors import DataError

FORMAT = "vae_scale.prepare/1"  # Part of every fingerprint: bump when the packing changes.


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """What to pack and how (the command line's flags; see `define_flags`)."""

  src: str
  out: str
  name: str
  eval_src: str = ""
  eval_fraction: float = 0.01
  seed: int = 0
  max_side: int = 512
  image_size: int = 256
  jpeg_quality: int = 95
  max_pixels: int = transforms.DEFAULT_MAX_PIXELS
  keep_duplicates: bool = False
  num_workers: int = 0  # 0: every core.
  chunk_size: int = 256
  work_dir: str = ""
  overwrite: bool = False
  beam_pipeline_options: str = ""
  keep_work_dir: bool = False
  first_skipped: int = 20
  skip_policy: skipping.SkipPolicy = skipping.SkipPolicy()

  def pack_options(self) -> packing.PackOptions:
    return packing.PackOptions(self.max_side, self.jpeg_quality, self.max_pixels)


def check(o: PrepareOptions) -> None:
  """Raises ConfigError (one line naming the flag) on the first bad option."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", o.name or ""):
    raise ConfigError(f"--name={o.name!r}: use lower case letters, digits and '_', starting with a "
                      "letter (TFDS's dataset names), e.g. --name=laion_512")
  if not o.src or not o.out:
    raise ConfigError("--src and --out are required")
  if o.max_side < o.image_size:
    raise ConfigError(f"--max_side={o.max_side} is below --image_size={o.image_size}: every crop "
                      "would be upscaled; use --max_side >= the training image_size (default "
                      "512: room for 256 crops at every scale)")
  if not 0 <= o.eval_fraction < 1:
    raise ConfigError(f"--eval_fraction={o.eval_fraction}: must be in [0, 1)")
  if not 1 <= o.jpeg_quality <= 100:
    raise ConfigError(f"--jpeg_quality={o.jpeg_quality}: must be in [1, 100]")
  if o.chunk_size < 1 or o.num_workers < 0 or o.max_pixels < 1:
    raise ConfigError("--chunk_size and --max_pixels must be >= 1, --num_workers >= 0")


def list_collection(o: PrepareOptions) -> list[image_collections.Unit]:
  """--eval_src's units (split 'validation') first, then --src's (split by --eval_fraction)."""
  held = (image_collections.list_units(o.eval_src, split=packing.VALIDATION,
                                       chunk_size=o.chunk_size) if o.eval_src else [])
  return held + image_collections.list_units(
      o.src, split=packing.TRAIN if o.eval_src else "", chunk_size=o.chunk_size,
      first_index=len(held))


def fingerprint(o: PrepareOptions, units: list[image_collections.Unit]) -> str:
  """Names the job: the units (every path, in order) and every option that changes the bytes."""
  h = hashlib.sha256()
  h.update(json.dumps([FORMAT, o.name, o.eval_fraction if not o.eval_src else None, o.seed,
                       o.max_side, o.jpeg_quality, o.max_pixels, o.keep_duplicates]).encode())
  for unit in units:
    h.update(json.dumps([unit.split, unit.tar, unit.files]).encode())
  return h.hexdigest()[:32]


def _report_fields(o: PrepareOptions, fp: str) -> dict[str, Any]:
  return {"name": o.name, "version": packed_dataset.VERSION, "fingerprint": fp, "src": o.src,
          "eval_src": o.eval_src, "eval_fraction": 0.0 if o.eval_src else o.eval_fraction,
          "seed": o.seed, "max_side": o.max_side, "jpeg_quality": o.jpeg_quality,
          "max_pixels": o.max_pixels, "keep_duplicates": o.keep_duplicates}


def _description(o: PrepareOptions, fp: str) -> str:
  return (f"Images packed by vae_scale.prepare from {o.src}"
          f"{' (held out: ' + o.eval_src + ')' if o.eval_src else ''}, max_side {o.max_side}; "
          f"job {fp}. See prepare_report.json.")


def _is_remote(path: str) -> bool:
  return "://" in path


def default_work_dir(o: PrepareOptions) -> str:
  """Local out: DATA_DIR/.vae_scale_prepare/NAME; gs:// out: a local temp folder named by it."""
  if o.work_dir:
    return o.work_dir
  if not _is_remote(o.out):
    return os.path.join(os.path.abspath(o.out), ".vae_scale_prepare", o.name)
  key = hashlib.sha1(f"{o.out}/{o.name}".encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "vae_scale_prepare", key)


# --------------------------------------------------------------------------- stage 1: pack units


def _pack_units(units: list[image_collections.Unit], work: epath.Path,
                o: PrepareOptions) -> dict[str, float]:
  """Packs the units not yet committed in `work`, on a process pool, with a progress bar."""
  done = staging.committed(work)
  todo = [u for u in units if u.index not in done]
  if done:
    logging.info("%d of %d units were packed by an earlier run; packing the other %d",
                 len(units) - len(todo), len(units), len(todo))
  workers = min(o.num_workers or os.cpu_count() or 1, max(len(todo), 1))
  known = all(not u.tar for u in todo)
  bar = tqdm(total=sum(len(u.files) for u in todo) if known else len(todo),
             unit=" images" if known else " shards", desc="Packing", smoothing=0.05)
  bad, images, start = skipping.BadFiles(o.skip_policy), 0, time.perf_counter()
  tasks = [(u, os.fspath(work), o.pack_options()) for u in todo]
  # spawn, not fork: the parent may hold TensorFlow's or JAX's threads.
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    results = (pool.imap_unordered(staging.pack_and_stage_task, tasks) if pool is not None else
               map(staging.pack_and_stage_task, tasks))
    for count, outcomes in results:
      images += count
      try:
        for reason, message in outcomes:
          if reason:
            bad.failed(message, tries_for_example=1)
          else:
            bad.good()
      except DataError as e:  # The trainer's rule, in the prepare's words.
        raise DataError(str(e).replace("config.data points at", f"--src={o.src!r}")) from e
      bar.update(count if known else 1)
      bar.set_postfix_str(f"{images / max(time.perf_counter() - start, 1e-9):.0f} images/s",
                          refresh=False)
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()
      pool.join()
  seconds = time.perf_counter() - start
  return {"images_packed": images, "units_packed": len(todo), "units_reused": len(done),
          "pack_seconds": seconds, "workers": workers}


# --------------------------------------------------------------------------- stage 2: write


def _write_local(units, work: epath.Path, o: PrepareOptions, fp: str, data_dir: str,
                 work_dir: str) -> epath.Path:
  selection = staging.Selection(units, work, o.first_skipped, o.keep_duplicates,
                                0.0 if o.eval_src else o.eval_fraction, o.seed)
  splits = {s: selection.units_with[s] for s in (packing.TRAIN, packing.VALIDATION)}
  if not splits[packing.TRAIN]:
    counts = selection.report.result()
    raise DataError(f"--src={o.src!r}: no usable image is left for 'train' ({counts['skipped']} "
                    f"of {counts['images_listed']} unusable, {counts['duplicates_dropped']} "
                    f"duplicates; first: {counts['first_skipped'][:3]}); check --src")
  split_datasets = {s: selection.examples(s, units, work) for s, has in splits.items() if has}
  fields = _report_fields(o, fp)
  return packed_dataset.build(packed_dataset.PackedImages, o.name, data_dir, split_datasets,
                              _description(o, fp), os.path.join(work_dir, "downloads"),
                              report=lambda: selection.report.result(**fields))


def _write_beam(units, o: PrepareOptions, fp: str, data_dir: str, work_dir: str
                ) -> epath.Path:
  from vae_scale.data import packed_beam  # pylint: disable=g-import-not-at-top  (Beam: ~2 s)
  return packed_dataset.build(
      packed_beam.BeamPackedImages, o.name, data_dir, {}, _description(o, fp),
      os.path.join(work_dir, "downloads"),
      beam_options=packed_beam.pipeline_options(o.beam_pipeline_options), units=units,
      options=o.pack_options(), eval_fraction=0.0 if o.eval_src else o.eval_fraction,
      seed=o.seed, keep_duplicates=o.keep_duplicates, report_fields=_report_fields(o, fp),
      first_n=o.first_skipped)


# --------------------------------------------------------------------------- the job


def _existing(o: PrepareOptions, fp: str) -> dict[str, Any] | None:
  """The report of a finished identical job at --out; None if there is none. Raises DataError
  for another dataset of that name (unless --overwrite, which deletes it)."""
  versions = packed_dataset.prepared_versions(o.out, o.name)
  if not versions:
    return None
  report = packed_dataset.read_report(versions[-1])
  if len(versions) == 1 and report and report.get("fingerprint") == fp:
    return report
  if not o.overwrite:
    what = ("was made from other images or options (job "
            f"{report.get('fingerprint')}, from {report.get('src')})" if report else
            "was not made by vae_scale.prepare")
    raise DataError(f"--out={o.out} already holds a dataset {o.name!r} "
                    f"({', '.join(v.name for v in versions)}) that {what}; pass --overwrite to "
                    "replace it, or choose another --name")
  return None


def prepare(o: PrepareOptions) -> dict[str, Any]:
  """Packs `o.src` into `o.out/o.name/1.0.0`; returns the report (plus this run's timings).

  Rerunning the same command after an interruption finishes the job; after success it returns
  the existing report at once.

  Raises:
    ConfigError: a bad option. DataError: no images, a truncated tar, nearly nothing usable, or
      --out holding another dataset of that name (without --overwrite). Nothing half-written is
      ever visible at --out.
  """
  check(o)
  units = list_collection(o)
  fp = fingerprint(o, units)
  work_dir = default_work_dir(o)
  done = _existing(o, fp)
  if done is not None:
    logging.info("%s/%s is already prepared by this job (%s)", o.out, o.name, fp)
    _clean_work(work_dir, o)
    return {**done, "already_prepared": True}
  dest = packed_dataset.version_dir(o.out, o.name)
  remote = _is_remote(o.out)
  build_dir = os.path.join(work_dir, "build") if remote else o.out
  start, timings = time.perf_counter(), {}
  built = packed_dataset.version_dir(build_dir, o.name)
  if not (remote and (packed_dataset.read_report(built) or {}).get("fingerprint") == fp):
    if o.beam_pipeline_options:
      _make_room(o, build_dir)
      built = _write_beam(units, o, fp, build_dir, work_dir)
    else:
      work = staging.open_job(work_dir, fp, {"src": o.src, "eval_src": o.eval_src})
      timings = _pack_units(units, work, o)
      _make_room(o, build_dir)
      built = _write_local(units, work, o, fp, build_dir, work_dir)
  if remote:
    for version in packed_dataset.prepared_versions(o.out, o.name):  # Only with --overwrite.
      version.rmtree()
    packed_dataset.publish(built, dest, fp)
  report = packed_dataset.read_report(dest) or {}
  _clean_work(work_dir, o)
  timings["total_seconds"] = time.perf_counter() - start
  logging.info("Prepared %s: %s", dest, json.dumps({k: report.get(k) for k in (
      "images_listed", "images_kept", "kept_by_split", "duplicates_dropped", "skipped")}))
  return {**report, **timings}


def _make_room(o: PrepareOptions, data_dir: str) -> None:
  """Before TFDS writes: delete killed builds' leftovers, and (--overwrite) the old dataset."""
  packed_dataset.clean_incomplete(data_dir, o.name)
  for version in packed_dataset.prepared_versions(data_dir, o.name):
    logging.info("Deleting %s (--overwrite)", version)
    version.rmtree()


def _clean_work(work_dir: str, o: PrepareOptions) -> None:
  path = epath.Path(work_dir)
  if not o.keep_work_dir and path.exists():
    path.rmtree()
    parent = path.parent
    if parent.name == ".vae_scale_prepare" and not any(parent.iterdir()):
      parent.rmdir()


# --------------------------------------------------------------------------- CLI


# The help of each flag; a flag per PrepareOptions field named here, its type and default the field's.
FLAG_HELP = {
    "src": "Images: a folder, a glob, a manifest .txt, or webdataset .tar shards (a glob or brace "
           "list); local or gs://.",
    "out": "TFDS data_dir the dataset goes to (local or gs://).",
    "name": "Dataset name (lower case, digits, '_').",
    "eval_src": "Held-out images ('validation'); empty: hold out --eval_fraction of --src.",
    "eval_fraction": "Share of --src held out, drawn by a seeded hash of each key (0: none).",
    "seed": "Seed of the held-out draw.",
    "max_side": "Shrink images whose shorter side exceeds this to it (stored as JPEG "
                "--jpeg_quality).",
    "image_size": "The training crop; --max_side must not be below it.",
    "jpeg_quality": "Quality of re-encoded JPEGs.",
    "max_pixels": "Skip images with more pixels (the trainer's data.max_pixels).",
    "keep_duplicates": "Keep exact duplicates (same file bytes) instead of the first only.",
    "num_workers": "Processes (0: every core).",
    "chunk_size": "Image files per work unit (the most a rerun redoes per worker; a tar is one "
                  "unit).",
    "work_dir": "Staging folder (default: OUT/.vae_scale_prepare/NAME, or a local temp folder for "
                "gs://).",
    "overwrite": "Replace another dataset of that name.",
    "beam_pipeline_options": "Run on Apache Beam with these options, e.g. 'runner=DirectRunner,"
                             "direct_num_workers=8,direct_running_mode=multi_processing' (TFDS's "
                             "format); empty: the local process pool.",
    "keep_work_dir": "Keep the staging folder.",
}


def define_flags() -> dict[str, Any]:
  """The flags of `python -m vae_scale.prepare` (defined by `entry` only): one per `FLAG_HELP`
  entry, typed and defaulted as its PrepareOptions field (no default: required)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  define = {"str": flags.DEFINE_string, "float": flags.DEFINE_float,
            "int": flags.DEFINE_integer, "bool": flags.DEFINE_bool}
  fields = {f.name: f for f in dataclasses.fields(PrepareOptions)}
  return {name: define[fields[name].type](
      name, None if fields[name].default is dataclasses.MISSING else fields[name].default, text)
          for name, text in FLAG_HELP.items()}


def main(argv: list[str], fl: dict[str, Any]) -> int:
  """Packs; prints the report's counts as one JSON line."""
  from vae_scale import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.usage_error(f"unexpected arguments {' '.join(argv[1:])}")
  values = {k: v.value for k, v in fl.items()}
  missing = [k for k in ("src", "out", "name") if not values[k]]
  if missing:
    raise cli.usage_error(f"--{', --'.join(missing)} required, e.g. --src=/data/images "
                          "--out=gs://bucket/tfds --name=my_images")
  report = prepare(PrepareOptions(**values))
  print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict)) or
                    k in ("kept_by_split", "skipped_by_reason")}))
  return 0


def entry() -> None:
  """`python -m vae_scale.prepare`: defines the flags, runs `main` through `cli.run` (exits)."""
  from vae_scale import cli  # pylint: disable=g-import-not-at-top
  fl = cli.main_module_flags(define_flags)
  cli.run(lambda argv: main(argv, fl))
