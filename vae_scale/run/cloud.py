r"""Google Cloud diagnostics of a run, each opt-in: stack traces of a hung run, goodput in Cloud Monitoring.

Both libraries come with the `gcp` extra (pip install 'vae_scale[gcp]') and are imported only when
a flag asks for them; asked for and missing, they are one ConfigError line (exit 2) naming the extra.

- `hang_diagnostics(enabled, timeout_s, to_cloud)` (--hang_diagnostics): cloud-tpu-diagnostics
  writes the main thread's stack on a fatal signal and a snapshot of it every `timeout_s`; and a
  watchdog re-armed by `HangWatch.beat()` (once per step) dumps every thread's stack when no step
  has completed for `timeout_s`, then again every `timeout_s` while none does. Why the watchdog:
  the library's snapshot is a Python signal handler, and CPython runs those only when the main
  thread comes back to the interpreter, never while it waits inside XLA for a collective that
  will not complete (the usual TPU hang); `faulthandler`'s watchdog thread dumps from C whatever
  the main thread is doing. A dump is a diagnosis, never an exit. With `to_cloud`
  (--stack_trace_to_cloud) both write to /tmp/debugging/stack_trace_*.txt, which XPK's
  stack-trace sidecar (launch/xpk.sh --stack-traces) forwards to Cloud Logging; else to stderr.
- `CloudGoodput` (--cloud_goodput): the goodput events of `vae_scale.run.goodput.Recorder`, in its
  vocabulary (`restored`, `phase`, `step_end`, `close`), also written to Cloud Logging through
  ml-goodput-measurement's GoodputRecorder, by process 0. With --cloud_goodput_upload_seconds=N
  a separate process runs the library's GoodputMonitor, which computes goodput and badput from
  those records every N s and uploads them to Cloud Monitoring (workload/goodput_time,
  badput_time, ...) and to TensorBoard under WORKDIR/goodput. WORKDIR/goodput.json stays the
  run's own record and source of truth; this is a copy for GCP's dashboards and alerts.

Flags are defined by `define_flags()` (from main's `__main__` block, never at import) and read
with `options_from_flags`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import hashlib
import importlib
import json
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, TextIO

from vae_scale import errors
from vae_scale.run import goodput

EXTRA = "pip install 'vae_scale[gcp]'"
# vae_scale.run.goodput's phases as ml-goodput-measurement records them: a start/end pair of the
# recorder's methods, or a custom badput event (blocking work that is not a training step).
PHASE_EVENTS: dict[str, tuple[str, str] | str] = {
    "startup": ("record_tpu_init_start_time", "record_tpu_init_end_time"),
    "restore": ("record_training_preparation_start_time", "record_training_preparation_end_time"),
    "data": ("record_data_loading_start_time", "record_data_loading_end_time"),
    "compile": "COMPILE",
    "eval": "EVAL",
    "checkpoint": "CHECKPOINT_SAVE",
    "rollback": "ROLLBACK",
}
_RUN_NAME = re.compile(r"^[a-z][-a-z0-9]{0,62}$")


@dataclasses.dataclass(frozen=True)
class Options:
  """What the flags of `define_flags` ask for (see their help)."""

  hang_diagnostics: bool = False
  hang_timeout_s: int = 1800
  stack_trace_to_cloud: bool = False
  cloud_goodput: bool = False
  cloud_goodput_run_name: str | None = None
  cloud_goodput_upload_s: int = 0


def define_flags(flag_values: Any = None) -> dict[str, Any]:
  """Defines the diagnostics flags (call once, from a `__main__` block); returns their holders.

  Args:
    flag_values: an absl FlagValues; None = absl's global FLAGS.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top  (defined on demand, not at import)
  where = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
  return {
      "hang_diagnostics": flags.DEFINE_boolean(
          "hang_diagnostics", False, "Stack traces of a hung run (cloud-tpu-diagnostics, the "
          "`gcp` extra): every thread's stack when no step completes for --hang_timeout_seconds, "
          "and the main thread's on a fatal signal. Diagnosis only: the run goes on.", **where),
      "hang_timeout_seconds": flags.DEFINE_integer(
          "hang_timeout_seconds", 1800, "--hang_diagnostics: seconds without a completed step "
          "before the stacks are dumped (again every as many seconds while it lasts). Longer than "
          "the slowest compile, evaluation or checkpoint, or those dump too (harmlessly).",
          lower_bound=60, **where),
      "stack_trace_to_cloud": flags.DEFINE_boolean(
          "stack_trace_to_cloud", False, "--hang_diagnostics: write the stacks to "
          "/tmp/debugging/, which XPK's stack-trace sidecar (launch/xpk.sh --stack-traces) sends "
          "to Cloud Logging, instead of stderr.", **where),
      "cloud_goodput": flags.DEFINE_boolean(
          "cloud_goodput", False, "Also record goodput events to Cloud Logging through "
          "ml-goodput-measurement (the `gcp` extra; GCP credentials), from process 0. "
          "WORKDIR/goodput.json is written either way.", **where),
      "cloud_goodput_run_name": flags.DEFINE_string(
          "cloud_goodput_run_name", None, "--cloud_goodput: the run's name in Cloud Logging and "
          "Cloud Monitoring (lowercase letters, digits, hyphens; at most 63). Default: from "
          "--workdir. Keep it across restarts: a new name starts a new record.", **where),
      "cloud_goodput_upload_seconds": flags.DEFINE_integer(
          "cloud_goodput_upload_seconds", 0, "--cloud_goodput: every this many seconds a "
          "separate process computes goodput and badput from the records and uploads them to "
          "Cloud Monitoring and TensorBoard (WORKDIR/goodput). 0: no upload here (run "
          "ml-goodput-measurement's GoodputMonitor elsewhere).", lower_bound=0, **where),
  }


def options_from_flags(holders: dict[str, Any]) -> Options:
  """The flags' values, checked together.

  Raises:
    ConfigError: a flag that only means something with another one, or a bad run name.
  """
  options = Options(
      hang_diagnostics=holders["hang_diagnostics"].value,
      hang_timeout_s=holders["hang_timeout_seconds"].value,
      stack_trace_to_cloud=holders["stack_trace_to_cloud"].value,
      cloud_goodput=holders["cloud_goodput"].value,
      cloud_goodput_run_name=holders["cloud_goodput_run_name"].value,
      cloud_goodput_upload_s=holders["cloud_goodput_upload_seconds"].value)
  if options.stack_trace_to_cloud and not options.hang_diagnostics:
    raise errors.ConfigError("--stack_trace_to_cloud needs --hang_diagnostics")
  if not options.cloud_goodput and (options.cloud_goodput_upload_s or
                                    options.cloud_goodput_run_name is not None):
    raise errors.ConfigError("--cloud_goodput_upload_seconds and --cloud_goodput_run_name need "
                             "--cloud_goodput")
  name = options.cloud_goodput_run_name
  if name is not None and not _RUN_NAME.match(name):
    raise errors.ConfigError(f"--cloud_goodput_run_name {name!r}: 1 to 63 lowercase letters, "
                             "digits and hyphens, starting with a letter")
  return options


def _import(module: str, flag: str, package: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise errors.ConfigError(f"{flag} needs the {package} package, which is not installed "
                             f"({e}): {EXTRA}") from e


def check_installed(options: Options) -> None:
  """Imports the libraries `options` ask for, before anything slow starts.

  Raises:
    ConfigError: one is missing; the message names the pip extra.
  """
  if options.hang_diagnostics:
    _diagnostics()
  if options.cloud_goodput:
    _import("ml_goodput_measurement", "--cloud_goodput", "ml-goodput-measurement")


def _diagnostics() -> tuple[Any, Any, Any]:
  """cloud-tpu-diagnostics' debug and stack-trace modules and its configuration module."""
  debug = _import("cloud_tpu_diagnostics.src.debug", "--hang_diagnostics", "cloud-tpu-diagnostics")
  stack_trace = _import("cloud_tpu_diagnostics.src.stack_trace", "--hang_diagnostics",
                        "cloud-tpu-diagnostics")
  configuration = _import("cloud_tpu_diagnostics.configuration", "--hang_diagnostics",
                          "cloud-tpu-diagnostics")
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


def default_run_name(workdir: str) -> str:
  """A run name for Cloud Logging derived from the workdir, stable across restarts.

  Returns:
    'vae-' + the workdir's last path part (slugged) + '-' + 8 hex digits of its hash; <= 63 chars.
  """
  tail = re.sub(r"[^a-z0-9]+", "-", str(workdir).rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
  digest = hashlib.sha256(str(workdir).rstrip("/").encode()).hexdigest()[:8]
  return f"vae-{tail[:46].strip('-') or 'run'}-{digest}"


def _utc(seconds: float) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


class CloudGoodput:
  """Goodput events to Cloud Logging (ml-goodput-measurement), as `goodput.Recorder` sees them.

  The session calls it beside its `goodput.Recorder`, with the same events. Disabled (processes
  other than 0, or --cloud_goodput off), every method is a no-op and nothing is imported.
  """

  def __init__(self, workdir: str, *, enabled: bool, run_name: str | None = None,
               upload_interval_s: int = 0, start_time: float | None = None,
               clock: Callable[[], float] = time.time):
    """Starts the record: the job's start (the process's, `start_time`) goes to Cloud Logging.

    Args:
      workdir: the run's workdir (names the run by default; TensorBoard output of the monitor).
      enabled: record (process 0 with --cloud_goodput).
      run_name: the job name in Cloud Logging; default `default_run_name(workdir)`.
      upload_interval_s: > 0 starts the GoodputMonitor process uploading every that many s.
      start_time: when this process started, on `clock`'s scale (time.time()); None = now.
      clock: wall-clock seconds since the epoch.

    Raises:
      ConfigError: ml-goodput-measurement is missing, or Cloud Logging cannot be reached (no
        credentials): --cloud_goodput was asked for and cannot work.
    """
    self._recorder: Any = None
    self._monitor: subprocess.Popen | None = None
    self.run_name: str | None = None
    self._clock = clock
    if not enabled:
      return
    library = _import("ml_goodput_measurement", "--cloud_goodput", "ml-goodput-measurement")
    self.run_name = run_name or default_run_name(workdir)
    logger_name = f"goodput_{self.run_name}"  # The library's documented convention.
    try:
      self._recorder = library.goodput.GoodputRecorder(
          job_name=self.run_name, logger_name=logger_name, logging_enabled=True)
    except Exception as e:  # pylint: disable=broad-except  (google-auth, google-cloud errors)
      detail = " ".join(str(e).split())
      raise errors.ConfigError(
          f"--cloud_goodput: cannot write to Cloud Logging ({type(e).__name__}: {detail}); run "
          "with GCP credentials (a TPU VM or GKE service account, or `gcloud auth "
          "application-default login`) or without --cloud_goodput") from e
    self._recorder.record_job_start_time(_utc(clock() if start_time is None else start_time))
    if upload_interval_s > 0:
      spec = {"job_name": self.run_name, "logger_name": logger_name,
              "tensorboard_dir": str(workdir), "upload_interval": int(upload_interval_s)}
      # A fresh interpreter, not a fork: the training process runs gRPC and XLA threads, which a
      # forked child inherits broken. It stops when its stdin closes: at `close`, or when this
      # process dies, however it dies.
      self._monitor = subprocess.Popen([sys.executable, "-m", "vae_scale.run.cloud",
                                        json.dumps(spec)], stdin=subprocess.PIPE)

  def restored(self, step: int) -> None:
    """The loop starts at `step`: the library times steps from one start to the next."""
    if self._recorder is not None:
      self._recorder.record_step_start_time(int(step), _utc(self._clock()))

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Records the block as `name` (one of goodput.CAUSES): start and end events."""
    if name not in goodput.CAUSES:
      raise ValueError(f"unknown goodput phase {name!r}; use one of {', '.join(goodput.CAUSES)}")
    if self._recorder is None:
      yield
      return
    event = PHASE_EVENTS[name]
    if isinstance(event, tuple):
      getattr(self._recorder, event[0])(_utc(self._clock()))
    else:
      self._recorder.record_custom_badput_event_start_time(_utc(self._clock()), event)
    try:
      yield
    finally:
      if isinstance(event, tuple):
        getattr(self._recorder, event[1])(_utc(self._clock()))
      else:
        self._recorder.record_custom_badput_event_end_time(_utc(self._clock()), event)

  def step_end(self, step: int) -> None:
    """`step` steps are done, so step number `step` starts now."""
    if self._recorder is not None:
      self._recorder.record_step_start_time(int(step), _utc(self._clock()))

  def close(self, monitor_timeout_s: float = 60.0) -> None:
    """Records the job's end, waits for the records to be sent, stops the monitor (its last
    upload included, up to `monitor_timeout_s`). Idempotent."""
    if self._recorder is not None:
      self._recorder.record_job_end_time(_utc(self._clock()))
      self._recorder.flush()
      self._recorder = None
    if self._monitor is not None:
      self._monitor.stdin.close()
      try:
        self._monitor.wait(timeout=monitor_timeout_s)
      except subprocess.TimeoutExpired:
        self._monitor.kill()
        self._monitor.wait()
      self._monitor = None


def _run_monitor(spec: dict[str, Any], stdin: TextIO) -> None:
  """The monitor process: GoodputMonitor uploads until `stdin` reaches its end."""
  library = importlib.import_module("ml_goodput_measurement")
  monitor = library.monitoring.GoodputMonitor(
      job_name=spec["job_name"], logger_name=spec["logger_name"],
      tensorboard_dir=spec["tensorboard_dir"], upload_interval=spec["upload_interval"],
      monitoring_enabled=True, include_badput_breakdown=True,
      gcp_options=library.goodput_utils.GCPOptions(enable_gcp_goodput_metrics=True,
                                                   enable_gcp_step_deviation_metrics=False))
  monitor.start_goodput_uploader()
  try:
    stdin.read()
  finally:
    monitor.stop_goodput_uploader()


if __name__ == "__main__":
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for training; it closes our stdin.
  _run_monitor(json.loads(sys.argv[1]), sys.stdin)
