r"""Stack traces of a hung run (--hang_diagnostics; cloud-tpu-diagnostics, the `gcp` extra).

`hang_diagnostics(enabled, timeout_s, to_cloud)` (--hang_diagnostics): cloud-tpu-diagnostics
writes the main thread's stack on a fatal signal and a snapshot of it every `timeout_s`; and a
watchdog re-armed by `HangWatch.beat()` (once per step) dumps every thread's stack when no step
has completed for `timeout_s`, then again every `timeout_s` while none does. Why the watchdog:
the library's snapshot is a Python signal handler, and CPython runs those only when the main
thread comes back to the interpreter, never while it waits inside XLA for a collective that
will not complete (the usual TPU hang); `faulthandler`'s watchdog thread dumps from C whatever
the main thread is doing. A dump is a diagnosis, never an exit. With `to_cloud`
(--stack_trace_to_cloud) both write to /tmp/debugging/stack_trace_*.txt, which XPK's
stack-trace sidecar (launch/xpk.sh --stack-traces) forwards to Cloud Logging; else to stderr.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import time
from typing import Any, Callable, Iterator, TextIO

from vae_scale.run import cloud


def _diagnostics() -> tuple[Any, Any, Any]:
  """cloud-tpu-diagnostics' debug and stack-trace modules and its configuration module."""
  debug, stack_trace, configuration = (
      cloud.require(m, "--hang_diagnostics", "cloud-tpu-diagnostics")
      for m in cloud.DIAGNOSTICS_MODULES)
  return debug, stack_trace, configuration


class HangWatch:
  """The hang watchdog of `hang_diagnostics`: `beat()` after every completed step."""

  def __init__(self, file: TextIO | Any | None, timeout_s: float,
               clock: Callable[[], float] = time.monotonic):
    """Args:
      file: where dumps go, a file with a descriptor (None: a watch that does nothing).
      timeout_s: seconds without a `beat()` before a dump, > 0.
      clock: monotonic seconds.
    """
    self._file, self._timeout_s, self._clock = file, float(timeout_s), clock
    self._armed_at: float | None = None

  def beat(self) -> None:
    """Restarts the countdown to a dump. Re-arming starts a thread, so it is done at most ten
    times per timeout: a dump comes between 0.9 and 1 timeout after the last completed step."""
    if self._file is None:
      return
    now = self._clock()
    if self._armed_at is None or now - self._armed_at >= self._timeout_s / 10:
      faulthandler.dump_traceback_later(self._timeout_s, repeat=True, file=self._file)
      self._armed_at = now

  def cancel(self) -> None:
    """Disarms the watchdog (the end of the run)."""
    if self._file is not None and self._armed_at is not None:
      faulthandler.cancel_dump_traceback_later()
      self._armed_at = None


@contextlib.contextmanager
def hang_diagnostics(enabled: bool, timeout_s: float, to_cloud: bool = False
                     ) -> Iterator[HangWatch]:
  """Stack traces of a hung run for the body of the `with` (see the module docstring).

  Args:
    enabled: False yields a HangWatch that does nothing, and imports nothing.
    timeout_s: seconds without a `beat()` before every thread's stack is dumped; also the
      interval of the library's main-thread snapshots.
    to_cloud: write to /tmp/debugging/ (XPK's sidecar forwards it to Cloud Logging), not stderr.

  Yields:
    The watch; call `beat()` after each completed step. The watchdog starts armed.

  Raises:
    ConfigError: enabled and cloud-tpu-diagnostics is not installed.
  """
  if not enabled:
    yield HangWatch(None, timeout_s)
    return
  debug, stack_trace, configuration = _diagnostics()
  config = configuration.stack_trace_configuration.StackTraceConfig(
      collect_stack_trace=True, stack_trace_to_cloud=to_cloud,
      stack_trace_interval_seconds=max(1, int(timeout_s)))
  previous_usr1 = signal.getsignal(signal.SIGUSR1)
  faulthandler_was_enabled = faulthandler.is_enabled()
  debug.start_debugging(configuration.debug_configuration.DebugConfig(stack_trace_config=config))
  # The library's open trace file (to_cloud), so that both write where the sidecar reads.
  watch = HangWatch(getattr(stack_trace, "_stack_trace_file_obj", None) or sys.stderr, timeout_s)
  watch.beat()
  try:
    yield watch
  finally:
    watch.cancel()
    # The library's own stop (diagnostic.diagnose's exit) joins its timer thread, which sleeps a
    # whole interval first: up to timeout_s at the end of a finished run. Set the flag that thread
    # checks before each snapshot instead, and undo what start_debugging did.
    debug._exit_flag.set()  # pylint: disable=protected-access  (pinned cloud-tpu-diagnostics 0.1.5)
    stack_trace.disable_stack_trace_dumping(config)
    signal.signal(signal.SIGUSR1, previous_usr1)
    if faulthandler_was_enabled:
      faulthandler.enable()
