"""Shared by the launch/ tests: executable stand-ins for the tools a launcher calls, and whether a
process still runs."""

import json
import os
import pathlib
import stat
import sys

# Stands in for any command line tool: appends [TOOL, ARGV...] to calls.jsonl in its directory,
# prints TOOL.out from there if present, and exits with the number in TOOL.exit (default 0).
_RECORDER = """#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
tool = os.path.basename(sys.argv[0])
with open(os.path.join(here, "calls.jsonl"), "a") as f:
  f.write(json.dumps([tool] + sys.argv[1:]) + "\\n")
out = os.path.join(here, tool + ".out")
if os.path.exists(out):
  sys.stdout.write(open(out).read())
code = os.path.join(here, tool + ".exit")
sys.exit(int(open(code).read()) if os.path.exists(code) else 0)
"""


def executable(path: pathlib.Path, text: str) -> pathlib.Path:
  """Writes `text` to `path` and makes it executable; returns `path`."""
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def recorders(bin_dir: pathlib.Path, *tools: str) -> pathlib.Path:
  """Puts a recording stand-in for each of `tools` in `bin_dir` (put it first on PATH)."""
  bin_dir.mkdir(parents=True, exist_ok=True)
  for tool in tools:
    executable(bin_dir / tool, _RECORDER.format(python=sys.executable))
  return bin_dir


def recorded(bin_dir: pathlib.Path) -> list[list[str]]:
  """The calls the stand-ins in `bin_dir` received, in order: [tool, arg, ...] each."""
  path = bin_dir / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      return f.read().rpartition(")")[2].split()[0] != "Z"
  except FileNotFoundError:
    return False
