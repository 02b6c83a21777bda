r"""Processes die with the launcher that started them, whatever signal ended it (SIGKILL included).

A launcher that is SIGTERMed forwards the signal and gives its processes a grace period to save
(vae_scale.local_launch). One that is SIGKILLed (the out-of-memory killer, a container runtime or a
batch system's `kill -9`) cannot: without more, its processes would train on as orphans, writing
into the workdir the next run uses. Two mechanisms, each enough on its own where it exists:

  * Linux's parent-death signal: `death_signal_preexec` sets PR_SET_PDEATHSIG = SIGKILL in the
    child between fork and exec (it survives exec), so the kernel kills the process the moment
    its launcher dies, even inside a long C++ call that holds the GIL. It fires when the *thread*
    that forked the child ends: launchers must start processes from their main thread (which
    `signal.signal` enforces in local_launch anyway).
  * A watchdog (`Watchdog`, this module run as `python -m vae_scale.tools.parent_death`): a tiny
    process in its own session, so a kill of the launcher's process group does not reach it, that
    reads the launcher's pipe. The launcher names each process it starts ("watch PID") and each it
    reaps ("reaped PID"); at EOF (the launcher is gone, however it ended) it SIGKILLs the process
    group of every process still named. That also takes each process's own children, such as
    Grain's data workers, whom the parent-death signal does not reach, and it works on macOS,
    which has no parent-death signal. Pids are named only until the launcher reaps them, so a
    pid reused later is never signalled.

Why SIGKILL rather than SIGTERM (which vae_scale.main turns into a save and exit 42): a launcher
that is SIGKILLed was denied its grace period by whoever killed it, and without the launcher no
one bounds a save (a peer already dead leaves the others waiting in a collective until JAX's
heartbeat timeout) or reports its outcome. The processes lose the steps since their last
checkpoint, as if the whole group had been SIGKILLed; Orbax's atomic renames keep every committed
checkpoint whole, and the rerun resumes from the latest one. A graceful stop is SIGTERM to the
launcher, which still forwards it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def death_signal_preexec() -> Callable[[], None] | None:
  """A `preexec_fn` that makes the child SIGKILLed when the calling thread's process dies.

  Returns:
    The function for `subprocess.Popen(preexec_fn=...)`, or None where there is no parent-death
    signal (not Linux); there the `Watchdog` alone stops the processes.
  """
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # Looked up before fork, not in the child.
  parent = os.getpid()

  def preexec() -> None:
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # The launcher died before prctl took effect: nobody will tell us.
      os.kill(os.getpid(), signal.SIGKILL)

  return preexec


class Watchdog:
  """The launcher's side of the watchdog process: start it first, then name each process.

  Writes that fail (the watchdog itself was killed) are ignored: the parent-death signal still
  holds on Linux.
  """

  def __init__(self):
    self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)

  def _send(self, line: str) -> None:
    try:
      self._proc.stdin.write(line.encode() + b"\n")
      self._proc.stdin.flush()
    except (BrokenPipeError, ValueError, OSError):
      pass

  def watch(self, pid: int) -> None:
    """From now on, `pid`'s process group is killed if the launcher dies."""
    self._send(f"watch {pid}")

  def reaped(self, pid: int) -> None:
    """`pid` has exited and been reaped by the launcher: never signal it (its pid may be reused)."""
    self._send(f"reaped {pid}")

  def close(self, timeout: float = 5.0) -> None:
    """Ends the watchdog (it kills whatever is still named, none after a normal end)."""
    try:
      self._proc.stdin.close()
    except (BrokenPipeError, OSError):
      pass
    try:
      self._proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()


def _kill_group(pid: int) -> bool:
  """SIGKILL for `pid`'s process group (its own session, as the launchers start them)."""
  for kill in (os.killpg, os.kill):  # os.kill: a process that does not lead a group.
    try:
      kill(pid, signal.SIGKILL)
      return True
    except (ProcessLookupError, PermissionError):
      continue
  return False


def watchdog_main(stream=None) -> list[int]:
  """The watchdog process: reads "watch PID" / "reaped PID" lines until EOF, then kills.

  Args:
    stream: binary lines (default: stdin, the launcher's pipe).
  Returns:
    The pids whose groups it signalled.
  """
  stream = stream or sys.stdin.buffer
  watched: list[int] = []
  for line in stream:
    verb, _, pid = line.decode(errors="replace").strip().partition(" ")
    if not pid.isdigit():
      continue
    if verb == "watch" and int(pid) not in watched:
      watched.append(int(pid))
    elif verb == "reaped" and int(pid) in watched:
      watched.remove(int(pid))
  killed = [pid for pid in watched if _kill_group(pid)]
  if killed:
    print(f"parent_death watchdog: the launcher is gone; killed the process groups of "
          f"{', '.join(map(str, killed))} (SIGKILL)", file=sys.stderr, flush=True)
  return killed


if __name__ == "__main__":
  # Ctrl-C in a terminal never reaches this session; a stray SIGHUP or SIGINT must not end the
  # watch either.
  for _s in (signal.SIGINT, signal.SIGHUP):
    signal.signal(_s, signal.SIG_IGN)
  watchdog_main()
