"""vae_scale/run/cloud_goodput.py against the real ml-goodput-measurement (the `gcp` extra, installed
with `test`). Nothing reaches the cloud: the recorder's Cloud Logging writer is replaced by a list,
and the monitor process gets a stand-in package first on its path."""

import datetime
import json
import os
import textwrap

import pytest
from ml_goodput_measurement import goodput as mgm_goodput  # The `test` extra installs it.

from conftest import REPO
from vae_scale import errors
from vae_scale.run import cloud
from vae_scale.run import cloud_goodput
from vae_scale.run import goodput


def test_default_run_name_is_stable_and_valid():
  a = cloud_goodput.default_run_name("gs://my-bucket/vae/Run_1/")
  assert a == cloud_goodput.default_run_name("gs://my-bucket/vae/Run_1") and a.startswith("vae-run-1-")
  assert a != cloud_goodput.default_run_name("gs://other-bucket/vae/Run_1")
  for workdir in ("/tmp/x", "gs://b/" + "A" * 90, "gs://b/___"):
    assert cloud.RUN_NAME.match(cloud_goodput.default_run_name(workdir)), workdir


# -- goodput through ml-goodput-measurement's real GoodputRecorder --------------------------------

class _CloudLogging:
  """Stands in for the library's Cloud Logging writer (its _CloudLogger): keeps the entries."""

  def __init__(self, job_name, log_name, **unused_kwargs):
    self.job_name, self.log_name = job_name, log_name
    self.entries, self.flushed = [], 0
    _CloudLogging.last = self

  def write_cloud_logging_entry(self, entry):
    self.entries.append(entry)

  def flush(self):
    self.flushed += 1


class _Clock:
  def __init__(self, t):
    self.t = t

  def __call__(self):
    return self.t


def test_goodput_events_reach_the_recorder_in_its_vocabulary(monkeypatch):
  monkeypatch.setattr(mgm_goodput, "_CloudLogger", _CloudLogging)
  clock = _Clock(1000.0)
  sink = cloud_goodput.CloudGoodput("gs://my-bucket/vae/run1", enabled=True, start_time=990.0, clock=clock)
  log = _CloudLogging.last
  assert (log.job_name, log.log_name) == (sink.run_name, f"goodput_{sink.run_name}")
  for name, t in (("startup", 1001.0), ("restore", 1003.0)):
    clock.t = t
    with sink.phase(name):
      clock.t += 1
  clock.t = 1010.0
  sink.restored(20)
  with sink.phase("data"):
    clock.t = 1011.0
  with sink.phase("compile"):
    clock.t = 1030.0
  clock.t = 1031.0
  sink.step_end(21)
  with sink.phase("eval"):
    clock.t = 1040.0
  with sink.phase("checkpoint"):
    clock.t = 1042.0
  sink.step_end(22)
  sink.close()
  sink.close()  # Idempotent.
  stamps = [{k: v for k, v in e.items() if k != "job_name"} for e in log.entries]
  assert all(e["job_name"] == sink.run_name for e in log.entries)
  assert stamps == [
      {"job_start_time": 990.0},
      {"tpu_init_start_time": 1001.0}, {"tpu_init_end_time": 1002.0},
      {"training_prep_start_time": 1003.0}, {"training_prep_end_time": 1004.0},
      {"step_count": 20, "step_start_time": 1010.0},
      {"data_loading_start_time": 1010.0}, {"data_loading_end_time": 1011.0},
      {"custom_badput_event_type": "COMPILE", "custom_badput_event_start_time": 1011.0},
      {"custom_badput_event_type": "COMPILE", "custom_badput_event_end_time": 1030.0},
      {"step_count": 21, "step_start_time": 1031.0},
      {"custom_badput_event_type": "EVAL", "custom_badput_event_start_time": 1031.0},
      {"custom_badput_event_type": "EVAL", "custom_badput_event_end_time": 1040.0},
      {"custom_badput_event_type": "CHECKPOINT_SAVE",
       "custom_badput_event_start_time": 1040.0},
      {"custom_badput_event_type": "CHECKPOINT_SAVE", "custom_badput_event_end_time": 1042.0},
      {"step_count": 22, "step_start_time": 1042.0},
      {"job_end_time": 1042.0},
  ]
  assert log.flushed == 1


def test_every_goodput_phase_has_an_event():
  assert set(cloud_goodput.PHASE_EVENTS) == set(goodput.CAUSES)
  for event in cloud_goodput.PHASE_EVENTS.values():
    for method in event if isinstance(event, tuple) else ():
      assert callable(getattr(mgm_goodput.GoodputRecorder, method)), method
  with pytest.raises(ValueError, match="unknown goodput phase 'lunch'"):
    with cloud_goodput.CloudGoodput("gs://b/r", enabled=False).phase("lunch"):
      pass


def test_no_credentials_is_one_config_error(monkeypatch):
  def no_credentials(*unused_args, **unused_kwargs):
    raise RuntimeError("Your default credentials were not found.\n  To set up ...")
  monkeypatch.setattr(mgm_goodput, "_CloudLogger", no_credentials)
  with pytest.raises(errors.ConfigError, match="--cloud_goodput: cannot write to Cloud Logging "
                     r"\(RuntimeError: Your default credentials were not found. To set up") as info:
    cloud_goodput.CloudGoodput("gs://b/r", enabled=True)
  assert "\n" not in str(info.value)


# -- the monitor process -------------------------------------------------------------------------

# A stand-in ml_goodput_measurement for the monitor process: records how GoodputMonitor was made
# and what was called on it.
_FAKE_LIBRARY = textwrap.dedent("""
    import json, os, types
    def _record(*event):
      with open(os.environ["FAKE_MONITOR_RECORD"], "a") as f:
        f.write(json.dumps(event) + "\\n")
    class GoodputMonitor:
      def __init__(self, **kwargs):
        options = kwargs.pop("gcp_options")
        _record("init", kwargs, vars(options))
      def start_goodput_uploader(self):
        _record("start")
      def stop_goodput_uploader(self):
        _record("stop")
    class GCPOptions:
      def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
    monitoring = types.SimpleNamespace(GoodputMonitor=GoodputMonitor)
    goodput_utils = types.SimpleNamespace(GCPOptions=GCPOptions)
    """)


@pytest.mark.slow
def test_monitor_runs_in_its_own_process_until_close(tmp_path, monkeypatch):
  monkeypatch.setattr(mgm_goodput, "_CloudLogger", _CloudLogging)
  fake = tmp_path / "fake" / "ml_goodput_measurement"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(_FAKE_LIBRARY)
  record = tmp_path / "record.jsonl"
  monkeypatch.setenv("FAKE_MONITOR_RECORD", str(record))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), str(REPO)]))
  sink = cloud_goodput.CloudGoodput("gs://my-bucket/vae/run1", enabled=True, run_name="vae-run1",
                            upload_interval_s=300)
  monitor = sink._monitor  # pylint: disable=protected-access
  assert monitor.poll() is None  # Running, until close() ends its stdin.
  sink.close(monitor_timeout_s=60)
  assert monitor.returncode == 0
  events = [json.loads(line) for line in record.read_text().splitlines()]
  assert events == [
      ["init", {"job_name": "vae-run1", "logger_name": "goodput_vae-run1",
                "tensorboard_dir": "gs://my-bucket/vae/run1", "upload_interval": 300,
                "monitoring_enabled": True, "include_badput_breakdown": True},
       {"enable_gcp_goodput_metrics": True, "enable_gcp_step_deviation_metrics": False}],
      ["start"], ["stop"]]


def test_utc_timestamps_round_trip():
  assert cloud_goodput._utc(1234.5).timestamp() == 1234.5  # pylint: disable=protected-access
  assert cloud_goodput._utc(0).tzinfo == datetime.timezone.utc  # pylint: disable=protected-access
