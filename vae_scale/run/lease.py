"""One run per workdir: process 0 of a run holds a lease on its workdir, renewed while it runs.

Two runs writing one workdir (a command rerun in a second terminal, a requeued batch job whose old
processes linger, two hosts given the same gs:// path) interleave checkpoints of two trajectories,
double-count goodput and race on retention. The lease makes the second one stop before it writes
anything. Its record (vae_scale.run.lease_store: WORKDIR/lease.json on gs://, WORKDIR/lease/ on
file systems, changed only by compare-and-swap) names the holder: run id, host, pid, heartbeat.

`Lease.acquire` reads the record and:
  * takes a free lease (none yet, or released by a run that ended: exit 0, 2, 3 or 42);
  * refuses at once, with LeaseError (exit 2) naming the holder, a holder on this machine whose
    process still runs (same host, boot and pid namespace; the pid's start time guards against a
    reused pid), or a holder elsewhere seen to renew its heartbeat while we watch (at most
    `renew_every_s`);
  * takes over, with a warning line, a holder on this machine whose process is gone (SIGKILL, the
    OOM killer: the rerun needs no wait) and any holder whose heartbeat is older than `timeout_s`
    (a lost VM, a dead node); a heartbeat younger than that which does not move is waited for
    until it does (refuse) or expires (take over), so that a batch system's prompt requeue after
    a node failure resumes instead of failing;
  * with `force=True` (the operator's --force_lease) takes it over from whoever holds it.
Wall clocks of different hosts are compared (the heartbeat is the holder's time.time()): keep
`timeout_s` far above their skew, as NTP does by a wide margin.

While held, a daemon thread renews the heartbeat every `renew_every_s`. A renewal that finds the
record changed means another run took the lease over (it judged this one dead): `lost` is set and
`check()` raises LeaseError, which the loop calls once per step so that this run writes no more.
`release()` (also on leaving `with Lease(...)`, and what an exit 42 after a save must call) marks
the record free, so the launchers' immediate rerun takes it without waiting.

Only process 0 of a multi-process run holds the lease: the others joined it through
jax.distributed, so they belong to whichever run holds it. Tools that only read a run's workdir
(evaluate, encode, convert export) take no lease.

The defaults (a heartbeat every 10 s, dead after 120 s) cost one small write every 10 s (on gs://
about 8,600 operations a day, pennies), refuse a live run elsewhere within about 10 s, and delay the
rerun after a lost host by at most 2 minutes, less than recreating a TPU slice takes.

Usage on process 0, before anything compiles:

  lease = Lease(workdir, run_id=run_id)
  lease.acquire(force=force_lease)        # LeaseError: exit 2, nothing written
  try:
    for step in ...: lease.check(); ...
  finally:
    lease.release()                       # also before an immediate exit 42 (os._exit)
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from absl import logging

from vae_scale.errors import LeaseError
from vae_scale.run import lease_store

VERSION = 1
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RENEW_EVERY_S = 10.0
_UNREADABLE_RETRIES = 5  # A record written in place (no hard links) can be seen half-written.


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="ascii", errors="replace") as f:
      return f.read().strip()
  except OSError:
    return None


def _start_ticks(pid: int) -> int | None:
  """The process's start time (field 22 of /proc/PID/stat), or None; 'Z' (a zombie) gives -1."""
  stat = _read_text(f"/proc/{pid}/stat")
  if stat is None:
    return None
  fields = stat.rpartition(")")[2].split()  # The command name may hold spaces and parentheses.
  return -1 if fields[0] == "Z" else int(fields[19])


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds (or last held) a workdir's lease.

  Attributes:
    run_id: the holding run's id (unique per session).
    host: socket.gethostname() of its process 0.
    pid: that process's id.
    heartbeat: when it last renewed the lease, seconds since the epoch (its clock).
    acquired: when it took the lease, seconds since the epoch.
    released: whether it let the lease go (its run ended).
    boot_id: Linux's boot id of its host (None elsewhere): a pid from another boot is dead.
    pid_namespace: inode of its pid namespace (Linux; None elsewhere): pids compare only within.
    start_ticks: its process's start time in clock ticks since boot (Linux; None elsewhere).
    write_id: unique per write, to recognise one's own write after an ambiguous failure.
  """

  run_id: str
  host: str
  pid: int
  heartbeat: float
  acquired: float
  released: bool = False
  boot_id: str | None = None
  pid_namespace: int | None = None
  start_ticks: int | None = None
  write_id: str = ""

  @classmethod
  def of_this_process(cls, run_id: str, now: float) -> "Holder":
    """This process as a holder that took the lease at `now`."""
    pid = os.getpid()
    try:
      namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
      namespace = None
    return cls(run_id=run_id, host=socket.gethostname(), pid=pid, heartbeat=now, acquired=now,
               boot_id=_read_text("/proc/sys/kernel/random/boot_id"), pid_namespace=namespace,
               start_ticks=_start_ticks(pid))

  def describe(self, now: float) -> str:
    """E.g. 'run 3f2a9c1e0b7d (pid 4242 on host-a, last heartbeat 12s ago)'."""
    return (f"run {self.run_id} (pid {self.pid} on {self.host}, last heartbeat "
            f"{max(0.0, now - self.heartbeat):.0f}s ago)")


def _alive_here(holder: Holder, me: Holder) -> bool | None:
  """Whether the holder's process runs, if it is on this machine and that can be told; else None."""
  if holder.host != me.host:
    return None
  if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
    return False  # The host rebooted since.
  if holder.pid_namespace != me.pid_namespace:
    return None  # Another container with the same host name.
  try:
    os.kill(holder.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Another user's process: it exists.
  ticks = _start_ticks(holder.pid)
  if ticks == -1 or (ticks is not None and holder.start_ticks is not None
                     and ticks != holder.start_ticks):
    return False  # A zombie, or the pid now belongs to another process.
  return True


def _encode(holder: Holder) -> bytes:
  return json.dumps({"version": VERSION, **dataclasses.asdict(holder)}, indent=1).encode()


def _decode(data: bytes) -> Holder:
  """Raises ValueError (or KeyError, TypeError) on anything but a version-1 record."""
  record: Any = json.loads(data)
  if not isinstance(record, dict) or record.pop("version", None) != VERSION:
    raise ValueError("not a version-1 lease record")
  fields = {f.name for f in dataclasses.fields(Holder)}
  return Holder(**{k: v for k, v in record.items() if k in fields})


def _read(store) -> tuple[int, Holder | None] | None:
  """(generation, holder) of the record, None without one; holder None if it stays unreadable."""
  for attempt in range(_UNREADABLE_RETRIES):
    current = store.read()
    if current is None:
      return None
    try:
      return current[0], _decode(current[1])
    except (ValueError, KeyError, TypeError):
      if attempt + 1 < _UNREADABLE_RETRIES:
        time.sleep(0.1)
  return current[0], None


def read_holder(workdir: str | os.PathLike) -> Holder | None:
  """The run holding `workdir`'s lease (live or stale), or None when it is free."""
  current = _read(lease_store.for_workdir(workdir))
  if current is None or current[1] is None or current[1].released:
    return None
  return current[1]


class Lease:
  """Process 0's lease on its run's workdir (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, *, run_id: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S,
               renew_every_s: float = DEFAULT_RENEW_EVERY_S,
               clock: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep):
    """Args:
      workdir: the run's workdir, local or gs://.
      run_id: this run's id in messages; default a fresh random one.
      timeout_s: a heartbeat this old means a dead holder; at least 3 x renew_every_s.
      renew_every_s: seconds between heartbeats, > 0.
      clock: seconds since the epoch (wall time, comparable across hosts).
      sleep: how to wait (tests pass a fake with `clock`).
    Raises:
      ValueError: bad timings, or a workdir URL other than gs://.
    """
    if not renew_every_s > 0 or not timeout_s >= 3 * renew_every_s:
      raise ValueError(f"lease timings: need renew_every_s > 0 and timeout_s >= 3 x "
                       f"renew_every_s, got {renew_every_s} and {timeout_s}")
    self.workdir = os.fspath(workdir)
    self.run_id = run_id or uuid.uuid4().hex[:12]
    self.timeout_s, self.renew_every_s = float(timeout_s), float(renew_every_s)
    self._clock, self._sleep = clock, sleep
    self._store = lease_store.for_workdir(workdir)
    self._lock = threading.Lock()  # Orders the renewing thread's writes and release().
    self._generation: int | None = None  # Of our latest write, while we hold the lease.
    self._holder: Holder | None = None
    self._lost = threading.Event()
    self._lost_to = ""
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------------------ public

  def acquire(self, force: bool = False) -> None:
    """Takes the lease or raises LeaseError naming the holder (nothing written then).

    May wait up to `timeout_s` for a holder whose heartbeat has stopped (see the module
    docstring); logs one warning line when it takes a lease over.

    Args:
      force: take the lease from whoever holds it (the operator knows that run is gone).
    Raises:
      LeaseError: another run holds it (exit code 2).
      OSError, google.api_core.exceptions.GoogleAPIError: the storage failed (retried first).
    """
    if self._holder is not None and not self._lost.is_set():
      return  # Already held.
    me = Holder.of_this_process(self.run_id, self._clock())
    watched: tuple[str, float] | None = None  # (run_id, first heartbeat seen) of a quiet holder.
    logged_wait = False
    while True:
      now = self._clock()
      current = _read(self._store)
      generation, holder = current if current is not None else (0, None)
      if current is not None and holder is None:
        reason = f"its record {self._store.url} is unreadable"
      elif holder is None or holder.released:
        reason = None  # Free.
      else:
        age = now - holder.heartbeat
        if watched is None or watched[0] != holder.run_id:
          watched = (holder.run_id, holder.heartbeat)
        reason = self._takeover_reason(holder, me, age, force)
        if reason is None:
          here = _alive_here(holder, me)
          if here or holder.heartbeat > watched[1]:  # Running here, or seen renewing.
            raise LeaseError(self._refusal(holder, now, bool(here)))
          # Quiet: wait for it to renew (refuse) or to expire (take over).
          if not logged_wait and age > 2 * self.renew_every_s:
            logging.warning("%s is leased to %s, which has stopped renewing it; waiting up to "
                            "%.0fs for it to renew or expire.", self.workdir,
                            holder.describe(now), self.timeout_s - age)
            logged_wait = True
          self._sleep(min(self.renew_every_s / 5, 1.0, self.timeout_s - age))
          continue
      mine = dataclasses.replace(me, heartbeat=now, acquired=now)
      if self._write(mine, generation):
        if reason is not None:
          previous = holder.describe(now) if holder is not None else "an unknown holder"
          logging.warning("Took over the lease on %s from %s: %s. Two runs writing one workdir "
                          "interleave their checkpoints; make sure that one is stopped.",
                          self.workdir, previous, reason)
        break
      force = False  # Lost a race: judge the winner like any holder.
    self._lost.clear()
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops renewing and marks the lease free; a no-op when not held. Never raises."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    with self._lock:
      if self._holder is None or self._lost.is_set():
        self._holder = None
        return
      try:
        self._write_locked(dataclasses.replace(self._holder, released=True), self._generation)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not release the lease on %s (%s: %s); the next run takes it over "
                        "after %.0fs.", self.workdir, type(e).__name__, e, self.timeout_s)
      self._holder = None

  @property
  def lost(self) -> bool:
    """Whether another run took the lease over while this one held it."""
    return self._lost.is_set()

  def check(self) -> None:
    """Raises LeaseError if the lease was lost (cheap: call it once per step)."""
    if self._lost.is_set():
      raise LeaseError(self._lost_to)

  def __enter__(self) -> "Lease":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  # --------------------------------------------------------------------------- internals

  def _takeover_reason(self, holder: Holder, me: Holder, age: float, force: bool) -> str | None:
    """Why a held lease may be taken over now, or None."""
    if force:
      return "--force_lease was given"
    if _alive_here(holder, me) is False:
      return "its process is no longer running"
    if age >= self.timeout_s:
      return f"no heartbeat for {age:.0f}s (timeout {self.timeout_s:.0f}s)"
    return None

  def _refusal(self, holder: Holder, now: float, here: bool) -> str:
    """The one line for a live holder: who, and how to proceed."""
    if here:
      return (f"{self.workdir} is in use by {holder.describe(now)}: stop that run first (kill "
              f"-TERM {holder.pid} saves a checkpoint and exits), or use another --workdir.")
    expires = max(0.0, self.timeout_s - (now - holder.heartbeat))
    return (f"{self.workdir} is in use by {holder.describe(now)}: stop that run first, or use "
            f"another --workdir; if its host is gone, rerun once its lease expires ({expires:.0f}s "
            f"without a heartbeat) or now with --force_lease.")

  def _write(self, holder: Holder, generation: int) -> bool:
    with self._lock:
      return self._write_locked(holder, generation)

  def _write_locked(self, holder: Holder, generation: int) -> bool:
    """Writes `holder` if the record is still at `generation`; whether it did."""
    holder = dataclasses.replace(holder, write_id=uuid.uuid4().hex)
    try:
      new_generation = self._store.write(_encode(holder), if_generation_match=generation)
    except lease_store.Conflict:
      # A retried write whose first attempt did land fails its own precondition: look.
      current = _read(self._store)
      if current is None or current[1] is None or current[1].write_id != holder.write_id:
        return False
      new_generation = current[0]
    self._generation, self._holder = new_generation, holder
    return True

  def _renew_loop(self) -> None:
    failing = False
    while not self._stop.wait(self.renew_every_s):
      with self._lock:
        if self._stop.is_set() or self._holder is None:
          return
        try:
          renewed = self._write_locked(
              dataclasses.replace(self._holder, heartbeat=self._clock()), self._generation)
        except Exception as e:  # pylint: disable=broad-except
          if not failing:  # Transient storage trouble: warn once, keep trying.
            failing = True
            logging.warning("Cannot renew the lease on %s (%s: %s); retrying every %gs.",
                            self.workdir, type(e).__name__, e, self.renew_every_s)
          continue
        failing = False
        if not renewed:
          self._on_lost()
          return

  def _on_lost(self) -> None:
    now = self._clock()
    current = _read(self._store)
    other = current[1].describe(now) if current and current[1] else "another run"
    self._lost_to = (f"lost the lease on {self.workdir} to {other}, which judged this run dead; "
                     f"this run stops writing there. Rerun only once that one is stopped.")
    logging.error("%s", self._lost_to)
    self._lost.set()
