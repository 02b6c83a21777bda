r"""The opt-in Google Cloud diagnostics of a run: their flags, checked together, and their libraries.

Two diagnostics, each its own module, each asked for by a flag of `define_flags`:
- --hang_diagnostics: stack traces of a hung run (`run.hang_watch`, cloud-tpu-diagnostics);
- --cloud_goodput: goodput events in Cloud Logging and Cloud Monitoring (`run.cloud_goodput`,
  ml-goodput-measurement).

Both libraries come with the `gcp` extra (pip install 'vae_scale[gcp]') and are imported only when
a flag asks for them; asked for and missing, they are one ConfigError line (exit 2) naming the
extra, raised by `check_installed` before anything slow starts.

Flags are defined by `define_flags()` (from main's `__main__` block, never at import) and read
with `options_from_flags`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

from vae_scale import errors

EXTRA = "pip install 'vae_scale[gcp]'"
# cloud-tpu-diagnostics' modules that --hang_diagnostics uses.
DIAGNOSTICS_MODULES = ("cloud_tpu_diagnostics.src.debug", "cloud_tpu_diagnostics.src.stack_trace",
                       "cloud_tpu_diagnostics.configuration")
RUN_NAME = re.compile(r"^[a-z][-a-z0-9]{0,62}$")  # A job name Cloud Logging takes.


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
  if name is not None and not RUN_NAME.match(name):
    raise errors.ConfigError(f"--cloud_goodput_run_name {name!r}: 1 to 63 lowercase letters, "
                             "digits and hyphens, starting with a letter")
  return options


def require(module: str, flag: str, package: str) -> Any:
  """Imports `module`, which `flag` needs.

  Raises:
    ConfigError: it is not installed; one line naming `package` and the pip extra.
  """
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
    for module in DIAGNOSTICS_MODULES:
      require(module, "--hang_diagnostics", "cloud-tpu-diagnostics")
  if options.cloud_goodput:
    require("ml_goodput_measurement", "--cloud_goodput", "ml-goodput-measurement")
