r"""Trains a KL autoencoder; rerunning the same command in the same workdir resumes.

  python -m vae_scale.main --config=configs/ldm_f8.py --workdir=DIR [--config.FIELD=VALUE ...]

Exit codes: 0 done; 2 bad config or data, or a workdir another live run holds (nothing compiled,
nothing lost); 42 preempted (a checkpoint of the reached step was saved: rerun the same command);
3 diverged (rollbacks used up or too many non-finite steps).
"""

from __future__ import annotations

if __name__ == "__main__":  # SIGTERM means "preempted, rerun" from the first instant (exit 42).
  from vae_scale.run import preemption  # pylint: disable=g-import-not-at-top  (stdlib only)
  _WATCH = preemption.Watch().install()

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from vae_scale import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/ldm_f8.py or configs/demo.py. Override "
    "any field with --config.FIELD=VALUE (e.g. --config.global_batch_size=256).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (local path or gs://): checkpoints, TensorBoard events, image "
    "grids. Rerunning in the same workdir resumes from its latest checkpoint.")
_FORCE_LEASE = flags.DEFINE_bool(
    "force_lease", False, "Take the workdir's lease from the run holding it. A run whose holder "
    "died is taken over by itself (at once on the same machine, else once its heartbeat is 120 s "
    "old); use this only when you know the holder is gone, and never leave it in a command that "
    "reruns (a second live run would then interleave checkpoints with the first).")


class _QuietLibraries:
  """Drops INFO lines of Orbax's internals (dozens per checkpoint); warnings and errors pass."""

  def filter(self, record) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= 30 or not noisy


def main(argv: list[str], distributed: dict, diagnostics: dict, watch) -> int:
  """Validates the config, starts jax.distributed, trains; errors reach `cli.run` as one line."""
  if len(argv) > 1:
    raise cli.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # pylint: disable=g-import-not-at-top
  import jax
  from vae_scale.config import schema
  from vae_scale.run import cloud
  from vae_scale.run import loop
  from vae_scale.run import session
  # pylint: enable=g-import-not-at-top
  config = _CONFIG.value
  schema.validate(config)  # Before touching devices: a typo costs a second, not a pod start.
  options = session.Options(force_lease=_FORCE_LEASE.value,
                            cloud=cloud.options_from_flags(diagnostics))
  cloud.check_installed(options.cloud)
  cli.init_distributed(distributed, watch)
  logging.info("Process %d of %d; %d local devices, %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("Local devices: %s", jax.local_devices())
  logging.info("Config:\n%s", config)
  loop.train_and_evaluate(config, _WORKDIR.value, watch, options)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  _DISTRIBUTED = cli.define_distributed_flags()
  from vae_scale.run import cloud as _cloud  # pylint: disable=g-import-not-at-top  (no JAX)
  _DIAGNOSTICS = _cloud.define_flags()
  cli.run(lambda argv: main(argv, _DISTRIBUTED, _DIAGNOSTICS, _WATCH))
  sys.exit(0)
