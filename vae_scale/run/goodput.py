"""Goodput across restarts: the share of a run's wall time that produced training steps it kept.

A run's wall time is the sum of its sessions (one per process start), and every second of a session
lands in exactly one bucket, so the shares always sum to 1:

  productive  step time of steps that are kept (the first step of a session is `startup`: it is
              where the loop starts and, unless wrapped in `phase("compile")`, where it compiles)
  recomputed  step time of steps trained and then lost: the run stopped after its last checkpoint,
              the next session restored an earlier step and trained them again
  startup     process start to the first step, less what is counted in another bucket
  restore, compile, eval, checkpoint, data
              the time inside `with recorder.phase(NAME):` (innermost phase wins when nested)
  rollback    the guard's rollbacks (`rolled_back`): the step time of the steps thrown away, and
              the time inside `phase("rollback")` (restoring the earlier checkpoint)
  other       the rest: time after the last step of a session, and time not yet attributed at the
              last write (the step in progress)

The record is `WORKDIR/goodput.json`, written by process 0 only (atomically: temp file + replace) at
construction, at `restored`, at every `flush` and at `close`. A session killed without warning
(SIGKILL, a lost VM) is accounted up to its last write; what came after is unknown: its span ends
there, and the gap from that write to the next session's start (the killed session's unrecorded end
plus however long the restart took, which may be a user's week-end) is reported apart as
`unaccounted_s`, outside the shares. Steps counted productive at a write but lost with the kill are
moved to `recomputed` when the next session restores an earlier checkpoint: each session remembers
the step up to which it counted productive time and that time at every committed checkpoint
(interpolated linearly between those marks if a restore lands elsewhere). Steps kept whose time was
never written (a checkpoint committed after the last write) are counted as `unrecorded_steps`.
Flush at every log step and right after each checkpoint to keep those gaps small; a flush is one
small JSON write.

A missing, unreadable or foreign goodput.json is never fatal: a warning, and a fresh record (the bad
file is kept as goodput.json.bad). Writes that fail are warned about once and otherwise ignored.

Usage in the loop (process 0 records, the others get a no-op recorder):

  rec = goodput.Recorder(workdir, enabled=jax.process_index() == 0, start_time=PROCESS_START)
  with rec.phase("restore"): ...
  rec.restored(start_step)
  for step in ...:
    with rec.phase("data"): batch = next(it)
    state, m = train_step(state, batch)      # first call of a variant under phase("compile")
    rec.step_end(step + 1)
    if log: writer.write_scalars(step + 1, rec.flush())
    if checkpoint: with rec.phase("checkpoint"): save(...); rec.checkpoint_committed(step + 1)
  rec.close(); logging.info(rec.summary())
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath

FILENAME = "goodput.json"
VERSION = 1
CAUSES = ("startup", "restore", "compile", "eval", "checkpoint", "data", "rollback")
BUCKETS = ("productive", "recomputed") + CAUSES + ("other",)
MAX_MARKS = 32  # Checkpoint marks kept per session (older ones: interpolated), bounding the file.


def _new_record() -> dict[str, Any]:
  return {"version": VERSION, "unaccounted_s": 0.0, "unrecorded_steps": 0, "sessions": []}


def _new_session(start: float) -> dict[str, Any]:
  return {"start": start, "last_write": start, "end": "open", "restored_step": None,
          "last_step": None, "kept_step": None,
          "seconds": {b: 0.0 for b in ("productive",) + CAUSES}, "marks": [],
          "recomputed_s": 0.0, "recomputed_steps": 0, "rolled_back_s": 0.0,
          "rolled_back_steps": 0}


def _checked(record: Any) -> dict[str, Any]:
  """The record with every field type-checked and converted; raises on anything malformed."""
  if not isinstance(record, dict) or record.get("version") != VERSION:
    raise ValueError(f"not a version-{VERSION} goodput record")
  opt_int = lambda v: None if v is None else int(v)
  sessions = []
  for s in record["sessions"]:
    seconds = {b: float(s["seconds"].get(b, 0.0)) for b in ("productive",) + CAUSES}
    sessions.append({
        "start": float(s["start"]), "last_write": float(s["last_write"]), "end": str(s["end"]),
        "restored_step": opt_int(s["restored_step"]), "last_step": opt_int(s["last_step"]),
        "kept_step": opt_int(s["kept_step"]), "seconds": seconds,
        "marks": [[int(m[0]), float(m[1])] for m in s["marks"]],
        "recomputed_s": float(s["recomputed_s"]), "recomputed_steps": int(s["recomputed_steps"]),
        # Records written before rollbacks existed lack these two.
        "rolled_back_s": float(s.get("rolled_back_s", 0.0)),
        "rolled_back_steps": int(s.get("rolled_back_steps", 0))})
  return {"version": VERSION, "unaccounted_s": float(record["unaccounted_s"]),
          "unrecorded_steps": int(record["unrecorded_steps"]), "sessions": sessions}


def _productive_at(session: dict[str, Any], step: int) -> float:
  """Productive seconds a session had counted when it completed `step` (linear between marks)."""
  lo, hi = session["restored_step"], session["last_step"]
  points = sorted([(lo, 0.0)] + [(s, p) for s, p in session["marks"] if lo < s < hi] +
                  [(hi, session["seconds"]["productive"])])
  step = min(max(step, lo), hi)
  for (s0, p0), (s1, p1) in zip(points, points[1:]):
    if s0 <= step <= s1:
      return p0 if s1 == s0 else p0 + (p1 - p0) * (step - s0) / (s1 - s0)
  return points[-1][1]


def totals(record: dict[str, Any]) -> dict[str, float]:
  """Seconds per bucket (see BUCKETS) over every session of a record, plus 'wall'."""
  out = {b: 0.0 for b in BUCKETS}
  wall = 0.0
  for s in record["sessions"]:
    span = max(0.0, s["last_write"] - s["start"])
    counted = sum(s["seconds"].values())
    wall += span
    out["productive"] += s["seconds"]["productive"] - s["recomputed_s"] - s["rolled_back_s"]
    out["recomputed"] += s["recomputed_s"]
    out["rollback"] += s["rolled_back_s"]
    for c in CAUSES:
      out[c] += s["seconds"][c]
    out["other"] += max(0.0, span - counted)
  out["wall"] = wall
  return out


def _duration(seconds: float) -> str:
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes = int(seconds // 60)
  if minutes < 60:
    return f"{minutes}m{int(seconds % 60):02d}s"
  return f"{minutes // 60}h{minutes % 60:02d}m"


class Recorder:
  """Accumulates one session's time into WORKDIR/goodput.json (see the module docstring).

  Cheap enough to call every step: a clock read and a few dict updates; files are written only at
  construction, `restored`, `flush` and `close`. With `enabled=False` (processes other than 0)
  every method is a no-op and `flush` returns {}.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               start_time: float | None = None, clock: Callable[[], float] = time.time):
    """Starts a session, closing the books of a previous one that was killed.

    Args:
      workdir: the run's workdir (local or gs://).
      enabled: record and write (process 0 only).
      start_time: when this process started, on `clock`'s scale (time.time() by default; the
        time before construction counts as startup); None = now.
      clock: seconds, comparable across processes and hosts (wall time, not monotonic).
    """
    self._enabled, self._clock = enabled, clock
    self._path = epath.Path(workdir) / FILENAME
    self._stack: list[str] = []
    self._pending = 0.0  # Unphased time since the last step: belongs to the next step.
    self._in_loop = False
    self._warned = False
    now = clock()
    self._mark = now if start_time is None else min(float(start_time), now)
    if not enabled:
      return
    self._record = self._load()
    sessions = self._record["sessions"]
    if sessions and sessions[-1]["end"] == "open":  # Killed after its last write.
      sessions[-1]["end"] = "killed"
      self._record["unaccounted_s"] += max(0.0, self._mark - sessions[-1]["last_write"])
    self._session = _new_session(self._mark)
    sessions.append(self._session)
    self._session["seconds"]["startup"] += now - self._mark
    self._mark = now
    self._write(now)

  def _load(self) -> dict[str, Any]:
    try:
      text = self._path.read_text()
    except FileNotFoundError:
      return _new_record()
    except OSError as e:
      logging.warning("Cannot read %s (%s); starting a new goodput record.", self._path, e)
      return _new_record()
    try:
      return _checked(json.loads(text))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
      bad = self._path.with_name(FILENAME + ".bad")
      logging.warning("%s is unreadable (%s: %s); starting a new goodput record (the old file is "
                      "kept as %s).", self._path, type(e).__name__, e, bad.name)
      try:
        self._path.replace(bad)
      except OSError:
        pass
      return _new_record()

  def _write(self, now: float) -> None:
    self._session["last_write"] = now
    tmp = self._path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
    try:
      self._path.parent.mkdir(parents=True, exist_ok=True)
      tmp.write_text(json.dumps(self._record, indent=1))
      tmp.replace(self._path)
    except OSError as e:
      if not self._warned:
        logging.warning("Cannot write %s (%s); goodput is not recorded until it can.",
                        self._path, e)
        self._warned = True

  def _attribute(self, now: float) -> None:
    """Gives the time since the last event to the open phase, startup, or the next step."""
    gap = now - self._mark
    if self._stack:
      self._session["seconds"][self._stack[-1]] += gap
    elif not self._in_loop:
      self._session["seconds"]["startup"] += gap
    else:
      self._pending += gap
    self._mark = now

  def restored(self, step: int) -> None:
    """Notes the step this session resumes from (0 for a fresh run); writes the record.

    Earlier sessions' productive time of steps after `step` moves to `recomputed`.
    """
    if not self._enabled:
      return
    step = int(step)
    earlier = [s for s in self._record["sessions"][:-1] if s["restored_step"] is not None]
    counted = max((s["kept_step"] for s in earlier), default=None)
    for s in earlier:
      if s["kept_step"] > step:
        kept = max(step, s["restored_step"])
        s["recomputed_s"] += _productive_at(s, s["kept_step"]) - _productive_at(s, kept)
        s["recomputed_steps"] += s["kept_step"] - kept
        s["kept_step"] = kept
    if counted is not None and step > counted:
      self._record["unrecorded_steps"] += step - counted
    self._session.update(restored_step=step, last_step=step, kept_step=step)
    self._write(self._clock())

  def rolled_back(self, to_step: int) -> None:
    """The guard rolled the run back to checkpoint `to_step`: the productive time of the steps
    after it, in this session and earlier ones, moves to `rollback`. The session goes on as a new
    one restored at `to_step` (the step-to-time marks of the old one stay consistent)."""
    if not self._enabled:
      return
    now = self._clock()
    self._attribute(now)
    self._pending = 0.0
    sessions = self._record["sessions"]
    for s in sessions:
      if s["restored_step"] is not None and s["kept_step"] > to_step:
        kept = max(int(to_step), s["restored_step"])
        s["rolled_back_s"] += _productive_at(s, s["kept_step"]) - _productive_at(s, kept)
        s["rolled_back_steps"] += s["kept_step"] - kept
        s["kept_step"] = kept
    self._session["end"], self._session["last_write"] = "rollback", now
    self._session = _new_session(now)
    self._session.update(restored_step=int(to_step), last_step=int(to_step), kept_step=int(to_step))
    sessions.append(self._session)
    self._write(now)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Counts the time inside the block as `name` (one of CAUSES), not as step time."""
    if not self._enabled:
      yield
      return
    if name not in CAUSES:
      raise ValueError(f"unknown goodput phase {name!r}; use one of {', '.join(CAUSES)}")
    self._attribute(self._clock())
    self._stack.append(name)
    try:
      yield
    finally:
      self._attribute(self._clock())
      self._stack.pop()

  def step_end(self, step: int) -> None:
    """Marks `step` (steps completed) done: the time since the previous step, less phases, was
    spent on the steps in between. The first call of a session ends `startup`."""
    if not self._enabled:
      return
    now = self._clock()
    if self._stack:  # Misuse (inside a phase): the phase keeps its time.
      self._attribute(now)
    elapsed, self._pending = self._pending + (now - self._mark), 0.0
    self._mark = now
    s = self._session
    s["seconds"]["productive" if self._in_loop else "startup"] += elapsed
    self._in_loop = True
    if s["restored_step"] is None:  # restored() was not called: assume a fresh start.
      s["restored_step"] = 0
    s["last_step"] = s["kept_step"] = max(int(step), s["restored_step"])

  def checkpoint_committed(self, step: int) -> None:
    """Remembers the productive time at `step`, a step a later session may restore."""
    if not self._enabled or self._session["last_step"] is None:
      return
    s = self._session
    marks = [m for m in s["marks"] if m[0] != step] + [[int(step), _productive_at(s, int(step))]]
    s["marks"] = marks[-MAX_MARKS:]  # Restores fall back a few checkpoints at most.

  def scalars(self, now: float | None = None) -> dict[str, float]:
    """The run's goodput so far as 'goodput/...' scalars (this session counted up to `now`)."""
    if not self._enabled:
      return {}
    last = self._session["last_write"]
    if self._session["end"] != "clean":  # A closed session ended at its last write.
      self._session["last_write"] = self._clock() if now is None else now
    t = totals(self._record)
    self._session["last_write"] = last
    denominator = sum(t[b] for b in BUCKETS) or 1.0
    out = {"goodput/goodput": t["productive"] / denominator, "goodput/wall_s": t["wall"]}
    for b in BUCKETS:
      out[f"goodput/{b}_s"] = t[b]
      out[f"goodput/{b}_share"] = t[b] / denominator
    sessions = self._record["sessions"]
    out["goodput/recomputed_steps"] = sum(s["recomputed_steps"] for s in sessions)
    out["goodput/rollback_steps"] = sum(s["rolled_back_steps"] for s in sessions)
    out["goodput/unrecorded_steps"] = self._record["unrecorded_steps"]
    out["goodput/unaccounted_s"] = self._record["unaccounted_s"]
    out["goodput/sessions"] = len(sessions)
    return out

  def flush(self) -> dict[str, float]:
    """Writes goodput.json and returns `scalars()` as of the write."""
    if not self._enabled:
      return {}
    now = self._clock()
    self._write(now)
    return self.scalars(now)

  def close(self) -> dict[str, float]:
    """Ends the session cleanly (the next session adds no unaccounted gap) and writes."""
    if not self._enabled:
      return {}
    self._session["end"] = "clean"
    return self.flush()

  def summary(self) -> str:
    """One line for the final log, e.g. 'goodput 87.3% of 1h02m over 3 sessions; badput: ...'."""
    if not self._enabled:
      return ""
    v = self.scalars()
    n = int(v["goodput/sessions"])
    line = (f"goodput {100 * v['goodput/goodput']:.1f}% of {_duration(v['goodput/wall_s'])} over "
            f"{n} session{'s' if n != 1 else ''}")
    bad = sorted(((v[f"goodput/{b}_share"], b) for b in BUCKETS if b != "productive"),
                 reverse=True)
    parts = []
    for share, b in bad:
      if share >= 0.0005:
        steps = int(v["goodput/recomputed_steps"])
        parts.append(f"{b} {100 * share:.1f}%" + (f" ({steps} steps)" if b == "recomputed" else ""))
    thrown = int(v["goodput/rollback_steps"])
    parts = [p + f" ({thrown} steps thrown away)" if thrown and p.startswith("rollback ") else p
             for p in parts]
    if parts:
      line += "; badput: " + ", ".join(parts)
    killed = sum(s["end"] == "killed" for s in self._record["sessions"])
    if killed:
      line += (f"; {_duration(v['goodput/unaccounted_s'])} unaccounted after the last writes of "
               f"{killed} killed session{'s' if killed != 1 else ''}")
    if v["goodput/unrecorded_steps"]:
      line += f"; {int(v['goodput/unrecorded_steps'])} kept steps with unrecorded time"
    return line
