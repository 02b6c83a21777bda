r"""Benchmarks, one subcommand each.

  python -m vae_scale.bench data [--dir DIR] [--workers 0,1,2] [--batch_size 64] ...

`data`: images/s of the real train pipeline (`data.pipeline.create_train_dataset` on a folder of
JPEGs, for several Grain worker counts) against a bare PIL loop (open, convert RGB, resize the
shorter side, random crop, flip, to float) on the same files, per wall-clock second and per
CPU-second of the whole process tree (trainer + workers), and how many train steps per second of
a per-host batch that feeds. Without --dir it writes realistic JPEGs (500x375 crops of
scikit-image's photographs, quality 90) to a temporary folder.

To add a benchmark: write `_add_<name>_args(parser)` and `run_<name>(args) -> dict` and list them
in `COMMANDS`, or, for one that parses its own absl flags, list its `main(argv)` in
`FLAG_COMMANDS` (`step` -> `vae_scale/tools/bench_step.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from PIL import Image

from vae_scale import cli
from vae_scale import errors

# --------------------------------------------------------------------------- CPU accounting


def _proc_cpu_seconds() -> dict[int, tuple[int, float]]:
  """pid -> (parent pid, user + system CPU seconds) of every process (Linux /proc)."""
  tick = os.sysconf("SC_CLK_TCK")
  table = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:  # Exited while we looked.
      continue
    table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
  return table


def tree_cpu_seconds(pid: int | None = None) -> float:
  """CPU seconds used so far by `pid` (default: this process) and its live descendants.

  Falls back to this process alone where /proc is missing. Grain's worker processes are children,
  so this is the pipeline's whole cost while they run.
  """
  pid = os.getpid() if pid is None else pid
  if not os.path.isdir("/proc"):
    return time.process_time()
  table = _proc_cpu_seconds()
  children: dict[int, list[int]] = {}
  for p, (ppid, _) in table.items():
    children.setdefault(ppid, []).append(p)
  total, todo = 0.0, [pid]
  while todo:
    p = todo.pop()
    total += table.get(p, (0, 0.0))[1]
    todo.extend(children.get(p, ()))
  return total


# --------------------------------------------------------------------------- data benchmark


def _add_data_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dir", default="",
                      help="folder of images to read; empty: generate --num_images JPEGs in a "
                      "temporary folder (with --dir given and empty, they are written there)")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--photo_size", default="500x375",
                      help="WxH of generated JPEGs (500x375: ImageNet's typical photo)")
  parser.add_argument("--image_size", type=int, default=256, help="train crop side")
  parser.add_argument("--batch_size", type=int, default=64, help="per-host batch")
  parser.add_argument("--workers", default="0,1,2", help="Grain worker counts to time")
  parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per setting")
  parser.add_argument("--rounds", type=int, default=3, help="report the median of this many")
  parser.add_argument("--warmup_seconds", type=float, default=4.0,
                      help="untimed seconds first (worker start-up, file cache)")
  parser.add_argument("--json", default="", help="also write the results to this file")
  parser.add_argument("--prepared", action="store_true",
                      help="also pack the images with vae_scale.prepare and time the pipeline on "
                      "the packed dataset side by side (see vae_scale/tools/bench_prepared.py)")


def write_sample_jpegs(folder: str, num: int, width: int, height: int, seed: int = 0) -> list[str]:
  """Writes `num` JPEGs (random crops of scikit-image photographs, resized to width x height)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  photos = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"))
            for n in ("astronaut", "coffee", "chelsea", "hubble_deep_field",
                      "immunohistochemistry", "retina", "rocket")]
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(num):
    path = os.path.join(folder, f"bench_{i:06d}.jpg")
    paths.append(path)
    if os.path.exists(path):
      continue
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    ch = int(rng.integers(h // 2, h + 1))
    cw = min(w, int(ch * width / height))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[top:top + ch, left:left + cw])
    if rng.random() < 0.5:
      crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
  return paths


def bare_pil_view(path: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """The reference: what a plain PIL loop does per image (no Grain, no special cases)."""
  with Image.open(path) as img:
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                     Image.Resampling.BICUBIC)
  arr = np.asarray(img)
  top = int(rng.integers(0, arr.shape[0] - size + 1))
  left = int(rng.integers(0, arr.shape[1] - size + 1))
  arr = arr[top:top + size, left:left + size]
  if rng.random() < 0.5:
    arr = arr[:, ::-1]
  return arr.astype(np.float32) / 127.5 - 1.0


def _time_loop(fn: Callable[[str, np.random.Generator], Any], files: list[str], seconds: float,
               warmup_seconds: float) -> dict[str, float]:
  """Runs fn over the files (cycling) in this process; images per wall and per CPU second."""
  rng = np.random.default_rng(0)
  end, i = time.perf_counter() + warmup_seconds, 0
  while time.perf_counter() < end or i < len(files):  # At least one pass warms the file cache.
    fn(files[i % len(files)], rng)
    i += 1
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    fn(files[(i + n) % len(files)], rng)
    n += 1
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall,
          "images_per_cpu_s": n / cpu}


def _pipeline_config(folder: str, image_size: int, batch_size: int, workers: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vae_scale.data import transforms  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = image_size
  config.global_batch_size = batch_size
  config.data = ml_collections.ConfigDict(dict(
      source="folder", path=folder, eval_path=folder, eval_fraction=0.0, num_workers=workers,
      prefetch_batches=4, max_pixels=transforms.DEFAULT_MAX_PIXELS))
  return config


def _time_pipeline(config: ml_collections.ConfigDict, seconds: float, warmup_seconds: float) -> dict[str, float]:
  """Images per wall and per CPU second (this process + its workers) of the train stream."""
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  from vae_scale.data import skipping  # pylint: disable=g-import-not-at-top
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  # Warm until every worker has handed over batches (round robin: worker i makes batch i, i+W, ...);
  # a worker still starting would otherwise be timed too (8 workers on 2 cores: 221 images/s
  # after 4 s of warm-up, 566 after 30 s).
  end, warm = time.perf_counter() + warmup_seconds, 0
  while time.perf_counter() < end or warm < 2 * config.data.num_workers + 2:
    next(it)
    warm += 1
  batches, skipped = 0, 0
  t0, c0 = time.perf_counter(), tree_cpu_seconds()
  cpu = 0.0
  while time.perf_counter() - t0 < seconds or cpu <= 0:  # Until the CPU clock has ticked too.
    skipped += int(next(it)[skipping.SKIPPED_KEY].sum())
    batches += 1
    if time.perf_counter() - t0 >= seconds:
      cpu = tree_cpu_seconds() - c0
  wall = time.perf_counter() - t0
  n = batches * config.global_batch_size
  close = getattr(it, "close", None)
  if close is not None:
    close()
  return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall,
          "images_per_cpu_s": n / cpu, "skipped": skipped}


def _warm_allocator() -> None:
  """Frees one multi-megabyte block, as a long-running process has, before anything is timed.

  glibc's malloc raises its mmap and trim thresholds the first time such a block is freed; until
  then it hands the ~1 MB arrays of a PIL loop back to the OS after every image and faults them
  in again, which made the bare loop ~25% slower in a fresh process than in a warm one (our
  transforms, whose per-image arrays are smaller, were unaffected). Warming gives the reference
  its best case.
  """
  block = np.ones(8 << 20, np.uint8)
  del block


def _versions() -> str:
  """The versions a data benchmark depends on, as one line."""
  from PIL import features  # pylint: disable=g-import-not-at-top
  from vae_scale.tools import bench_costs  # pylint: disable=g-import-not-at-top
  found = bench_costs.versions(("grain", "pillow", "numpy"))
  found["libjpeg-turbo"] = features.version_feature("libjpeg_turbo")
  return ", ".join(f"{k} {v}" for k, v in found.items())


def run_data(args: argparse.Namespace) -> dict[str, Any]:
  """The `data` benchmark; prints a Markdown table and returns the figures."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vae_scale.data import file_lists  # pylint: disable=g-import-not-at-top
  from vae_scale.errors import DataError  # pylint: disable=g-import-not-at-top
  from vae_scale.data import transforms  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags.
    flags.FLAGS.mark_as_parsed()
  _warm_allocator()
  tmp = None
  folder = args.dir
  if not folder:
    tmp = tempfile.TemporaryDirectory(prefix="vae_scale_bench_")
    folder = tmp.name
  width, height = (int(v) for v in args.photo_size.lower().split("x"))
  try:
    have = len(file_lists.list_image_files(folder))
  except DataError:
    have = 0
  if have < args.num_images and not args.dir or have == 0:
    print(f"Writing {args.num_images} {width}x{height} JPEGs to {folder} ...", flush=True)
    write_sample_jpegs(folder, args.num_images, width, height)
  files = file_lists.list_image_files(folder)
  size, cores = args.image_size, os.cpu_count()
  print(f"{len(files)} files in {folder}; crop {size}; per-host batch {args.batch_size}; "
        f"{cores} CPU cores; {_versions()}", flush=True)

  # Settings interleaved, `--rounds` times; each figure is the median over rounds (the machine
  # may be shared: CPU-seconds are the steadier measure, wall-clock rates the one that feeds).
  settings: list[tuple[str, Callable[[], dict[str, float]]]] = [
      ("bare PIL loop (1 process)", lambda: _time_loop(
          lambda f, r: bare_pil_view(f, size, r), files, args.seconds, args.warmup_seconds)),
      ("vae_scale transforms in a plain loop (1 process)", lambda: _time_loop(
          lambda f, r: transforms.train_view(transforms.load_image(f, min_size=size), size, r),
          files, args.seconds, args.warmup_seconds)),
  ]
  for workers in (int(w) for w in args.workers.split(",")):
    config = _pipeline_config(folder, size, args.batch_size, workers)
    what = (f"Grain pipeline, {workers} worker process{'es' if workers > 1 else ''}" if workers
            else "Grain pipeline, 0 workers (4 threads in the trainer process)")
    settings.append((what, lambda c=config: _time_pipeline(c, args.seconds,
                                                           args.warmup_seconds)))
  prepared = None
  if args.prepared:
    from vae_scale.tools import bench_prepared  # pylint: disable=g-import-not-at-top  (TFDS)
    packed = tempfile.TemporaryDirectory(prefix="vae_scale_bench_packed_")
    prepared = bench_prepared.prepare_folder(folder, files, packed.name, size)
    print(f"Prepared {prepared['images']} images: {prepared['prepare_images_per_cpu_s']:.0f} per "
          f"CPU-s; {prepared['bytes_ratio']:.2f}x fewer bytes", flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
      config = bench_prepared.pipeline_config(prepared["dataset"], size, args.batch_size, workers)
      settings.append((f"Grain pipeline on the prepared dataset, {workers} workers",
                       lambda c=config: _time_pipeline(c, args.seconds, args.warmup_seconds)))
  runs: dict[str, list[dict[str, float]]] = {what: [] for what, _ in settings}
  for r in range(args.rounds):
    for what, fn in settings:
      runs[what].append(fn())
      print(f"round {r + 1}/{args.rounds}: {what}: {runs[what][-1]['images_per_s']:.0f} images/s, "
            f"{runs[what][-1]['images_per_cpu_s']:.0f} per CPU-s", flush=True)
  rows = [(what, {k: float(np.median([run[k] for run in rs])) for k in rs[0]})
          for what, rs in runs.items()]
  bare = rows[0][1]

  print()
  print("| loader | images/s | images per CPU-s | per-core vs bare loop | steps/s fed "
        f"(batch {args.batch_size}) |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for what, r in rows:
    r["per_core_vs_bare"] = r["images_per_cpu_s"] / bare["images_per_cpu_s"]
    r["steps_per_s"] = r["images_per_s"] / args.batch_size
    print(f"| {what} | {r['images_per_s']:.0f} | {r['images_per_cpu_s']:.0f} | "
          f"{r['per_core_vs_bare']:.2f} | {r['steps_per_s']:.2f} |")
  best = max(rows[2:], key=lambda row: row[1]["images_per_s"])
  print(f"\nBest: {best[0]}: {best[1]['images_per_s']:.0f} images/s feeds "
        f"{best[1]['steps_per_s']:.2f} steps/s of batch {args.batch_size}; per CPU-second it "
        f"delivers {best[1]['per_core_vs_bare']:.2f}x the bare PIL loop.")
  results = {"command": " ".join(["python -m vae_scale.bench"] + sys.argv[1:]),
             "files": len(files), "photo_size": [width, height], "image_size": size,
             "batch_size": args.batch_size, "cpu_cores": cores, "versions": _versions(),
             "rows": [{"loader": what, **r} for what, r in rows], "runs": runs,
             "prepared": prepared}
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if tmp is not None:
    tmp.cleanup()
  if prepared is not None:
    packed.cleanup()
  return results


# --------------------------------------------------------------------------- entry point

# name -> (help, add arguments, run). Add an argparse benchmark by adding a row.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], Any]]] = {
    "data": ("input pipeline images/s vs a bare PIL loop", _add_data_args, run_data),
}


def _step_main(argv: list[str]) -> int:
  """`bench step`: `bench_step.main`, imported when it runs (it starts JAX; `bench data` doesn't)."""
  from vae_scale.tools import bench_step  # pylint: disable=g-import-not-at-top
  return bench_step.main(argv)


# name -> (help, main(argv) -> exit code): benchmarks that parse their own (absl) flags; the rest of
# the command line is passed on untouched.
FLAG_COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "step": ("train step time, images/s and MFU (flags: see vae_scale/tools/bench_step.py)",
             _step_main),
}


def main(argv: list[str] | None = None) -> int:
  """Runs `python -m vae_scale.bench COMMAND ...`; returns the exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in FLAG_COMMANDS:
    return FLAG_COMMANDS[argv[0]][1](argv[1:]) or 0
  parser = argparse.ArgumentParser(prog="python -m vae_scale.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (help_text, add_args, _) in COMMANDS.items():
    add_args(sub.add_parser(name, help=help_text))
  for name, (help_text, _) in FLAG_COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  args = parser.parse_args(argv)
  try:
    COMMANDS[args.command][2](args)
  except errors.Error as e:
    return cli.report(e)
  return 0


def entry() -> None:
  """`python -m vae_scale.bench`: runs `main` and exits with its code."""
  sys.exit(main())
