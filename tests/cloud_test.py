"""vae_scale/run/cloud.py: the diagnostics' flags, checked together, and their libraries imported
only when a flag asks (the `gcp` extra, installed with `test`)."""

import sys

import pytest
from absl import flags

from vae_scale import errors
from vae_scale.run import cloud
from vae_scale.run import cloud_goodput
from vae_scale.run import hang_watch

# -- flags ---------------------------------------------------------------------------------------

def _holders(argv):
  values = flags.FlagValues()
  holders = cloud.define_flags(values)
  values(["main", *argv])
  return holders


def test_flags_default_to_nothing_and_parse():
  assert cloud.options_from_flags(_holders([])) == cloud.Options()
  options = cloud.options_from_flags(_holders([
      "--hang_diagnostics", "--hang_timeout_seconds=600", "--stack_trace_to_cloud",
      "--cloud_goodput", "--cloud_goodput_run_name=vae-run1", "--cloud_goodput_upload_seconds=300"]))
  assert options == cloud.Options(True, 600, True, True, "vae-run1", 300)


@pytest.mark.parametrize("argv, message", [
    (["--stack_trace_to_cloud"], "--stack_trace_to_cloud needs --hang_diagnostics"),
    (["--cloud_goodput_upload_seconds=60"], "need --cloud_goodput"),
    (["--cloud_goodput", "--cloud_goodput_run_name=Run_1"], "--cloud_goodput_run_name 'Run_1'"),
])
def test_flag_mistakes_are_one_config_error(argv, message):
  with pytest.raises(errors.ConfigError, match=message) as info:
    cloud.options_from_flags(_holders(argv))
  assert "\n" not in str(info.value)


def test_flag_bounds_are_absl_errors():
  with pytest.raises(flags.IllegalFlagValueError):
    _holders(["--hang_timeout_seconds=10"])


@pytest.mark.parametrize("modules, options, message", [
    (("cloud_tpu_diagnostics", "cloud_tpu_diagnostics.src.debug"), cloud.Options(
        hang_diagnostics=True), "--hang_diagnostics needs the cloud-tpu-diagnostics package"),
    (("ml_goodput_measurement",), cloud.Options(cloud_goodput=True),
     "--cloud_goodput needs the ml-goodput-measurement package"),
])
def test_missing_library_is_one_line_naming_the_extra(monkeypatch, modules, options, message):
  for name in modules:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError.
  with pytest.raises(errors.ConfigError, match=message) as info:
    cloud.check_installed(options)
  assert "pip install 'vae_scale[gcp]'" in str(info.value) and "\n" not in str(info.value)
  assert info.value.exit_code == 2


def test_nothing_is_imported_unless_asked(monkeypatch):
  for name in ("cloud_tpu_diagnostics", "ml_goodput_measurement"):
    monkeypatch.setitem(sys.modules, name, None)
  cloud.check_installed(cloud.Options())
  with hang_watch.hang_diagnostics(False, 60) as watch:
    watch.beat()
  sink = cloud_goodput.CloudGoodput("gs://b/run", enabled=False)
  sink.restored(0)
  with sink.phase("eval"):
    sink.step_end(1)
  sink.close()
