"""What an evaluation leaves behind: scalars, image grids, PNGs, the run's history, log lines.

One report for the train loop's evaluations and `python -m vae_scale.evaluate` alike:
- `publish`: TensorBoard scalars (`PREFIX/psnr`, ..., one per latent channel) and image grids, the
  grids as PNGs (process 0), and one log line in LDM Table 8's columns (`table_line`);
- the history of a run's held-out evaluations, kept across resumes: one JSON line each in
  WORKDIR/eval_history.jsonl (`append_history`, `read_history`, `history_summary`). A resumed run
  re-evaluates the steps after its checkpoint: the later record of a step is the one kept;
- `Progress`: the evaluation's progress line (batches, images/s, ETA).
"""

from __future__ import annotations

import datetime
import io
import json
import time
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

HISTORY = "eval_history.jsonl"
HISTORY_METRICS = ("psnr", "ssim", "lpips", "rfid", "l1")  # Those a record keeps, when measured.


# --------------------------------------------------------------------------- one evaluation


def table_line(result: dict[str, Any]) -> str:
  """One line in LDM Table 8's columns (rFID, PSNR, SSIM), then LPIPS, for a result of
  `evaluator.Evaluator` (absent metrics show as '-')."""
  rfid = f"{result['rfid']:.3f}" if result.get("rfid") is not None else "-"
  lp = (f"{result['lpips']:.4f} ± {result['lpips_std']:.4f}" if result.get("lpips") is not None
        else "-")
  return (f"rFID {rfid} | PSNR {result['psnr']:.2f} ± {result['psnr_std']:.2f} | SSIM "
          f"{result['ssim']:.3f} ± {result['ssim_std']:.3f} | LPIPS {lp} | "
          f"{result['num_images']} images")


def latent_line(result: dict[str, Any]) -> str:
  """The latent's statistics of a result: std, the high-frequency share, the VF cosine."""
  line = f"latent std {result['latent_std']:.4g}"
  if result.get("latent_hf_share") is not None:
    line += f", spectral energy above Nyquist/2 {100 * result['latent_hf_share']:.1f}%"
  if result.get("vf_cosine") is not None:
    line += f", VF cosine {result['vf_cosine']:.4f}"
  return line


def scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
  """The scalar metrics of a result for TensorBoard: floats, plus one per latent channel."""
  out = {f"{prefix}/{k}": v for k, v in result.items() if isinstance(v, float)}
  for c, (kl, mean, std) in enumerate(zip(result["kl_per_channel"],
                                          result["latent_mean_per_channel"],
                                          result["latent_std_per_channel"])):
    out[f"{prefix}/kl_channel_{c}"] = kl
    out[f"{prefix}/latent_mean_channel_{c}"] = mean
    out[f"{prefix}/latent_std_channel_{c}"] = std
  return out


def tile(rows: np.ndarray) -> np.ndarray:
  """Images [R, C, H, W, 3] in [-1, 1] -> one uint8 grid [R*H, C*W, 3]."""
  rows = np.clip((np.asarray(rows, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  r, c, h, w, ch = rows.shape
  return rows.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)


def write_png(path: epath.PathLike, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] grid as a PNG (local or gs://)."""
  buf = io.BytesIO()
  Image.fromarray(grid).save(buf, format="PNG")
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(buf.getvalue())


def publish(writer: Any, step: int, result: dict[str, Any], grids: dict[str, np.ndarray], *,
            prefix: str, png_dir: epath.PathLike, is_chief: bool, what: str = "Eval") -> dict[str, str]:
  """Writes one evaluation: scalars, grids (TensorBoard and PNG) and one log line.

  Args:
    writer: a clu MetricWriter (every process calls; process 0's writes).
    step: the step the evaluated weights were trained for.
    result: `evaluator.Evaluator`'s metrics.
    grids: name -> uint8 [rows*H, cols*W, 3] grids to write (may be empty).
    prefix: the scalars' and images' prefix, e.g. 'eval' (train loop) or 'evaluate'.
    png_dir: where `{name}_{step:08d}.png` go (local or gs://).
    is_chief: this process writes the PNGs (process 0).
    what: the log line's first word.
  Returns:
    {grid name: PNG path}.
  """
  writer.write_scalars(step, scalars(result, prefix))
  files = {}
  if grids:
    writer.write_images(step, {f"{prefix}/{k}": v[None] for k, v in grids.items()})
  for name, grid in grids.items():
    files[name] = str(epath.Path(png_dir) / f"{name}_{step:08d}.png")
    if is_chief:
      write_png(files[name], grid)
  logging.info("%s at step %d: %s, L1 %.4f, %s", what, step, table_line(result), result["l1"],
               latent_line(result))
  return files


class Progress:
  """Logs `done/total batches, images/s, ETA` every `every` batches (0: never)."""

  def __init__(self, total_batches: int, every: int, what: str = "Evaluation"):
    self.total, self.every, self.what = total_batches, every, what
    self.start, self.images = time.perf_counter(), 0.0

  def update(self, batches_done: int, images: float) -> None:
    """Called after each batch with the batches done so far and that batch's (global) images."""
    self.images += images
    if not self.every or (batches_done % self.every and batches_done != self.total):
      return
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    eta = datetime.timedelta(seconds=round(elapsed / batches_done * (self.total - batches_done)))
    logging.info("%s: %d/%d batches, %d images, %.1f images/s, ETA %s", self.what, batches_done,
                 self.total, int(self.images), self.images / elapsed, eta)


# --------------------------------------------------------------------------- a run's history


def append_history(workdir: epath.PathLike, step: int, result: dict[str, Any],
                   grid: str | None = None) -> dict[str, Any]:
  """Adds the evaluation `result` at `step` (and its grid's path) to the run's history; returns
  the record."""
  record = {"step": int(step)}
  record.update({k: float(result[k]) for k in HISTORY_METRICS if result.get(k) is not None})
  if grid:
    record["grid"] = str(grid)
  path = epath.Path(workdir) / HISTORY
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):  # A torn last line (killed mid-write) stays on its own.
    old += "\n"
  # Read and rewritten whole (a few kB): cloud buckets have no append.
  path.write_text(old + json.dumps(record, sort_keys=True) + "\n")
  return record


def append_event(workdir: epath.PathLike, step: int, event: str) -> None:
  """Marks an event of the run in its history at `step` (e.g. a rollback); shown by the summary."""
  path = epath.Path(workdir) / HISTORY
  old = path.read_text() if path.exists() else ""
  old += "\n" if old and not old.endswith("\n") else ""
  path.write_text(old + json.dumps({"step": int(step), "event": event}, sort_keys=True) + "\n")


def _records(workdir: epath.PathLike) -> list[dict[str, Any]]:
  path = epath.Path(workdir) / HISTORY
  out = []
  for line in (path.read_text().splitlines() if path.exists() else ()):
    try:
      record = json.loads(line)
      out.append(dict(record, step=int(record["step"])))
    except (ValueError, KeyError, TypeError):
      continue
  return out


def read_history(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """The evaluation records by step, the last of each step; a torn last line (a kill mid-write) is
  left out, and so are events."""
  by_step = {r["step"]: r for r in _records(workdir) if "event" not in r}
  return [by_step[s] for s in sorted(by_step)]


def read_events(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """The events marked in the history (`append_event`), in order: {'step', 'event'}."""
  return [r for r in _records(workdir) if "event" in r]


def history_summary(records: list[dict[str, Any]],
                    events: list[dict[str, Any]] | None = None) -> str:
  """The history as a small table, the events, then the last grid's path (or a line saying there
  is none)."""
  if not records:
    return "No held-out evaluation was recorded."
  cols = [k for k in HISTORY_METRICS if any(k in r for r in records)]
  lines = ["Held-out evaluation history:", "  step  " + "  ".join(f"{c:>8}" for c in cols)]
  for r in records:
    lines.append(f"{r['step']:>6}  " + "  ".join(
        f"{r[c]:>8.4f}" if c in r and c != "psnr" else f"{r[c]:>8.2f}" if c in r else f"{'-':>8}"
        for c in cols))
  lines += [f"  step {e['step']}: {e['event']}" for e in events or ()]
  grids = [r["grid"] for r in records if "grid" in r]
  lines.append(f"Last reconstruction grid (inputs above, reconstructions below): {grids[-1]}"
               if grids else "No reconstruction grid was written.")
  return "\n".join(lines)
