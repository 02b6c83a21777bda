r"""Goodput events in Cloud Logging and Cloud Monitoring (--cloud_goodput; ml-goodput-measurement).

`CloudGoodput` (--cloud_goodput): the goodput events of `vae_scale.run.goodput.Recorder`, in its
vocabulary (`restored`, `phase`, `step_end`, `close`), also written to Cloud Logging through
ml-goodput-measurement's GoodputRecorder, by process 0. With --cloud_goodput_upload_seconds=N
a separate process runs the library's GoodputMonitor, which computes goodput and badput from
those records every N s and uploads them to Cloud Monitoring (workload/goodput_time,
badput_time, ...) and to TensorBoard under WORKDIR/goodput. WORKDIR/goodput.json stays the
run's own record and source of truth; this is a copy for GCP's dashboards and alerts.
"""

from __future__ import annotations

import contextlib
import datetime
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
from vae_scale.run import cloud
from vae_scale.run import goodput

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
    library = cloud.require("ml_goodput_measurement", "--cloud_goodput",
                            "ml-goodput-measurement")
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
      self._monitor = subprocess.Popen([sys.executable, "-m", "vae_scale.run.cloud_goodput",
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
