"""A run's held-out evaluations, kept across resumes: one JSON line each in WORKDIR/eval_history.jsonl.

Process 0 appends a record after every evaluation of the train loop (step, the metrics, the grid
written then, if any); the end of a run prints the whole history from it, not just the evaluations of
the last session. A resumed run re-evaluates the steps after its checkpoint: the later record of a
step is the one kept.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

FILENAME = "eval_history.jsonl"
METRICS = ("psnr", "ssim", "lpips", "rfid", "l1")  # Those a record keeps, when measured.


def append(workdir: str | epath.Path, step: int, result: dict[str, Any],
           grid: str | None = None) -> dict[str, Any]:
  """Adds the evaluation `result` (`evaluation.Evaluator`'s) at `step` to the history; returns it."""
  record = {"step": int(step)}
  record.update({k: float(result[k]) for k in METRICS if result.get(k) is not None})
  if grid:
    record["grid"] = str(grid)
  path = epath.Path(workdir) / FILENAME
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):  # A torn last line (killed mid-write) stays on its own.
    old += "\n"
  # Read and rewritten whole (a few kB): cloud buckets have no append.
  path.write_text(old + json.dumps(record, sort_keys=True) + "\n")
  return record


def read(workdir: str | epath.Path) -> list[dict[str, Any]]:
  """The records by step, the last of each step; a torn last line (a kill mid-write) is left out."""
  path = epath.Path(workdir) / FILENAME
  by_step = {}
  for line in (path.read_text().splitlines() if path.exists() else ()):
    try:
      record = json.loads(line)
      by_step[int(record["step"])] = record
    except (ValueError, KeyError, TypeError):
      continue
  return [by_step[s] for s in sorted(by_step)]


def summary(records: list[dict[str, Any]]) -> str:
  """The history as a small table, then the last grid's path (or a line saying there is none)."""
  if not records:
    return "No held-out evaluation was recorded."
  cols = [k for k in METRICS if any(k in r for r in records)]
  lines = ["Held-out evaluation history:", "  step  " + "  ".join(f"{c:>8}" for c in cols)]
  for r in records:
    lines.append(f"{r['step']:>6}  " + "  ".join(
        f"{r[c]:>8.4f}" if c in r and c != "psnr" else f"{r[c]:>8.2f}" if c in r else f"{'-':>8}"
        for c in cols))
  grids = [r["grid"] for r in records if "grid" in r]
  lines.append(f"Last reconstruction grid (inputs above, reconstructions below): {grids[-1]}"
               if grids else "No reconstruction grid was written.")
  return "\n".join(lines)
