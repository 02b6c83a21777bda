"""SIGTERM means "preempted, rerun": exit 42 from the first instant of a run to its last.

`Watch().install()` is the first thing `main` does, before the heavy imports. From then on a SIGTERM
(a preemption notice, `launch/local.sh` or SLURM stopping the run) ends the run with exit code 42:

- before the first train step has completed (imports, config, distributed start-up, restore,
  compilation, the step-0 evaluation) there is nothing to save: the process exits 42 at once,
  leaving the checkpoint it may have been reading untouched;
- once steps have completed, the loop sees `requested()` after the step, evaluation or save under
  way, saves the step it reached and exits 42. Multi-process runs agree on that step through JAX's
  preemption sync point: the signal is handed on to JAX's own notifier.

How "at once" works while the main thread is inside C++ (an XLA compile, an Orbax read): Python's
C-level handler writes the signal number to a wakeup pipe immediately, and a watcher thread acts on
it; the Python-level handler alone would run only when the main thread returns to Python.

Fault injection for tests: `VAE_SCALE_SIGTERM_AT=PHASE[:N]` makes the process send itself SIGTERM on
its N-th entry (default 1st) into PHASE (startup, restore, compile, eval, save, step).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator

from vae_scale.errors import PREEMPTED_EXIT_CODE  # Stdlib only, like this module.

FAULT_ENV = "VAE_SCALE_SIGTERM_AT"


class _Sigaction(ctypes.Structure):
  """glibc's `struct sigaction` (Linux): only the handler and the flags are read."""

  _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
              ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4


def _c_handler(signum: int) -> Callable[[], None] | None:
  """The C function currently handling `signum` (installed by native code), as a callable."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    old = _Sigaction()
    if libc.sigaction(signum, None, ctypes.byref(old)) != 0 or not old.handler or old.handler in (
        signal.SIG_DFL, signal.SIG_IGN):
      return None
  except (OSError, AttributeError):
    return None
  if old.flags & _SA_SIGINFO:
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(old.handler)
    return lambda: fn(signum, None, None)
  fn1 = ctypes.CFUNCTYPE(None, ctypes.c_int)(old.handler)
  return lambda: fn1(signum)


class Watch:
  """The run's SIGTERM policy; one per process, created and installed by `main`."""

  def __init__(self):
    self.start_time = time.time()  # For goodput: the process's start-up counts from here.
    self._event = threading.Event()
    self._saving_allowed = threading.Event()  # Set once a step has completed.
    self._forward: Callable[[], None] | None = None
    self._entries: dict[str, int] = {}
    self._fault = os.environ.get(FAULT_ENV, "")
    self._on_exit: list[Callable[[], None]] = []
    self._installed = False

  def install(self) -> "Watch":
    """Takes over SIGTERM (main thread only); a no-op when called again."""
    if self._installed or threading.current_thread() is not threading.main_thread():
      return self
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, self._python_handler)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_fd,), name="sigterm-watch",
                     daemon=True).start()
    self._installed = True
    self.phase_entered("startup")
    return self

  def after_distributed_init(self) -> None:
    """Takes SIGTERM back from JAX's preemption notifier (which `jax.distributed.initialize`
    installs) and hands it on to that notifier once steps have completed."""
    if not self._installed:
      return
    self._forward = _c_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, self._python_handler)

  def steps_completed(self) -> None:
    """From now on a SIGTERM is saved by the loop instead of ending the process at once."""
    self._saving_allowed.set()
    if self._event.is_set() and self._forward is not None:
      self._forward()

  def requested(self) -> bool:
    """Whether a SIGTERM arrived (the loop saves and raises Preempted)."""
    return self._event.is_set()

  def at_exit(self, fn: Callable[[], None]) -> None:
    """Runs `fn` (flush logs, say why) before an immediate exit 42."""
    self._on_exit.append(fn)

  def phase_entered(self, name: str) -> None:
    """Marks the start of a phase; fires the test fault injection if it names this entry."""
    self._entries[name] = self._entries.get(name, 0) + 1
    if self._fault:
      want, _, nth = self._fault.partition(":")
      if want == name and self._entries[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGTERM)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """`with watch.phase('compile'): ...` marks a phase (see `phase_entered`)."""
    self.phase_entered(name)
    yield

  # ------------------------------------------------------------------------- internals

  def _python_handler(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._event.set()  # The watcher thread acts; this runs when the main thread is in Python.

  def _watch(self, read_fd: int) -> None:
    while True:
      try:
        data = os.read(read_fd, 64)
      except InterruptedError:
        continue
      if not data:
        return
      if signal.SIGTERM not in data:
        continue
      self._event.set()
      if not self._saving_allowed.is_set():
        self._exit_now()
      elif self._forward is not None:
        self._forward()  # JAX's notifier: every process reaches the same sync step.

  def _exit_now(self) -> None:
    for fn in self._on_exit:
      try:
        fn()
      except Exception:  # pylint: disable=broad-except
        pass
    print("preempted: SIGTERM before the first step completed; nothing to save. Rerun the same "
          "command to resume.", file=sys.stderr, flush=True)
    os._exit(PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access
