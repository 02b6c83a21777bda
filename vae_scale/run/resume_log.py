"""WORKDIR/resume_log.jsonl: one JSON object per event that changed how a run goes on.

Two kinds of entries, both written by process 0: a config change at a resume (`reconcile`: field,
old, new, kind, warn, message) and a rollback by the guard (`session`: kind 'rollback', trigger,
to_step, skipped steps and examples, message). Every entry has `time` and `step`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from etils import epath

FILENAME = "resume_log.jsonl"


def append(workdir: epath.PathLike, entries: Sequence[dict[str, Any]]) -> None:
  """Appends `entries`, one JSON line each. Read-modify-write and an atomic replace: works on
  gs:// (no appends there), and a kill mid-write leaves the previous file whole."""
  if not entries:
    return
  path = epath.Path(workdir) / FILENAME
  text = path.read_text() if path.exists() else ""
  text += "\n" if text and not text.endswith("\n") else ""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
  tmp.write_text(text + "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
  tmp.replace(path)


def read(workdir: epath.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
  """The entries in order (of `kind` only, if given); a torn last line is left out."""
  path = epath.Path(workdir) / FILENAME
  out = []
  for line in (path.read_text().splitlines() if path.exists() else ()):
    try:
      entry = json.loads(line)
    except ValueError:
      continue
    if isinstance(entry, dict) and (kind is None or entry.get("kind") == kind):
      out.append(entry)
  return out
