"""The one bootstrap of every command line (main, evaluate, encode, convert, bench).

- `define_distributed_flags()`: --distributed, --coordinator_address, --num_processes,
  --process_id, --heartbeat_timeout_seconds, defined by a call from each tool's `__main__` block
  (never at import, so the tools' modules can be imported together in one process).
- `init_distributed(flags)`: starts jax.distributed as asked or as the cluster needs.
- `run(main)`: absl's app.run with flag mistakes (a misspelt --config.FIELD) as one line and exit 2,
  and any `vae_scale.errors.Error` as one line on stderr and its exit code (2 bad config, data or
  weights; 3 diverged (rollbacks used up or too many non-finite steps); 42 preempted).
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import Any, Callable

from vae_scale import errors


def define_distributed_flags() -> dict[str, Any]:
  """The multi-process flags, as a dict of absl flag holders for `init_distributed`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return {
      "distributed": flags.DEFINE_enum(
          "distributed", "auto", ["auto", "on", "off"],
          "Multi-process JAX: 'auto' initializes jax.distributed when an explicit coordinator is "
          "given or a cluster is detected (TPU pod, SLURM with several tasks); 'on' always; 'off' "
          "never."),
      "coordinator_address": flags.DEFINE_string(
          "coordinator_address", None, "HOST:PORT of process 0 for jax.distributed (e.g. "
          "127.0.0.1:12345 to rehearse a multi-host run on one machine). Auto-detected on TPU and "
          "SLURM."),
      "num_processes": flags.DEFINE_integer("num_processes", None, "Processes in the run."),
      "process_id": flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1."),
      "heartbeat_timeout_seconds": flags.DEFINE_integer(
          "heartbeat_timeout_seconds", 100, "jax.distributed: after this long without a heartbeat "
          "from a peer, the other processes stop with an error instead of waiting for it forever."),
  }


def define_weights_flags(verb: str, config_help: str) -> dict[str, Any]:
  """--config, --workdir, --params, --step, --weights: which weights a tool `verb`s with.

  --config is optional with --workdir: the config stored with the run's checkpoint is used.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, config_help + " Default with --workdir: the config stored with the "
          "run's checkpoint. Override fields with --config.FIELD=VALUE.", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, f"Run directory whose checkpoint {verb}."),
      "params": flags.DEFINE_string(
          "params", None, f"{verb.capitalize()} these weights instead of a run: a params dir from "
          "`vae_scale.convert import`, a diffusers folder or an SD .safetensors."),
      "step": define_step_flag("Checkpoint step, or 'best' (the best by the run's "
                               "checkpoint.keep_best); default: the latest."),
      "weights": flags.DEFINE_enum("weights", "auto", ["auto", "ema", "params"],
                                   "auto = EMA weights when the run has them."),
  }


def define_step_flag(help_text: str) -> Any:
  """--step: a checkpoint's step number, or 'best'; None (unset) means the latest."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  holder = flags.DEFINE_string("step", None, help_text)
  flags.register_validator("step", lambda v: v is None or v == "best" or v.isdigit(),
                           "--step takes a checkpoint's step number or 'best'")
  return holder


def run_config(fl: dict[str, Any]) -> Any:
  """--config if given, else the config stored with --workdir's checkpoint (--step or the latest).

  Raises:
    ConfigError: neither is there.
  """
  if fl["config"].value is not None:
    return fl["config"].value
  workdir = fl["workdir"].value
  if not workdir:
    raise usage_error("--config is required without --workdir")
  from vae_scale.config import serialize  # pylint: disable=g-import-not-at-top
  from vae_scale.run import checkpoints  # pylint: disable=g-import-not-at-top
  if not checkpoints.list_steps(workdir):
    raise usage_error(f"{workdir} has no checkpoint yet; pass --config=THE_RUN'S_CONFIG")
  directory, step = checkpoints.resolve_step(workdir, fl["step"].value)
  stored = checkpoints.stored_config(directory, step)
  if stored is None:
    raise usage_error(f"{workdir} has no checkpoint with a stored config (step {step}); pass "
                      "--config=THE_RUN'S_CONFIG")
  return serialize.from_dict(stored)


def cluster_detected() -> bool:
  """Whether JAX's own cluster detection (TPU VM metadata, GKE, SLURM, Open MPI) finds a cluster."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    return any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if c.__name__ != "Mpi4pyCluster")
  except Exception:  # pylint: disable=broad-except
    # Private API moved: fall back to the GKE/TPU variable; --distributed=on forces it.
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def init_distributed(fl: dict[str, Any], watch: Any = None) -> None:
  """Starts jax.distributed as the flags (or the detected cluster) ask; a no-op otherwise.

  Args:
    fl: the holders `define_distributed_flags` returned.
    watch: the process's `preemption.Watch`, which takes SIGTERM back from JAX's notifier.
  """
  import jax  # pylint: disable=g-import-not-at-top
  mode, coordinator = fl["distributed"].value, fl["coordinator_address"].value
  if mode == "off" or (mode == "auto" and coordinator is None and not cluster_detected()):
    return
  extra = {"heartbeat_timeout_seconds": fl["heartbeat_timeout_seconds"].value}
  if coordinator is not None:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=fl["num_processes"].value,
                               process_id=fl["process_id"].value, **extra)
  else:
    jax.distributed.initialize(**extra)
  _cache_per_cpu_process(jax)
  if watch is not None:
    watch.after_distributed_init()


def _cache_per_cpu_process(jax: Any) -> None:
  """Gives each process of a multi-process CPU run its own subdirectory of the persistent
  compilation cache: PROCESS_of_COUNT.

  Two CPU processes (gloo collectives) sharing one cache directory hung mid-run in this project's
  tests (jax 0.10.2): an executable that one process wrote, loaded by another. Each process reading
  only what it wrote itself keeps the cache's gain (the next run of the same process loads its
  programs instead of compiling them). Accelerator runs and single-process runs share the cache.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  directory = jax.config.jax_compilation_cache_dir
  if jax.process_count() > 1 and jax.default_backend() == "cpu" and directory:
    own = os.path.join(directory, f"{jax.process_index()}_of_{jax.process_count()}")
    logging.info("Persistent compilation cache of this CPU process: %s", own)
    jax.config.update("jax_compilation_cache_dir", own)


def _one_line(text: str) -> str:
  return re.sub(r"\s+", " ", text.replace("\\n", " ")).strip()


def parse_flags(argv: list[str], flag_values: Any = None) -> list[str]:
  """absl's parser over `flag_values` (default: the global FLAGS); returns the leftover argv.

  Raises:
    ConfigError: a flag or a --config.FIELD override mistake, as one line.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except flags.Error as e:
    raise errors.ConfigError(f"{_one_line(str(e))}. Pass --help for the flags.") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # From ml_collections overrides.
    text = str(e.args[0]) if e.args else str(e)
    if text[:1] in "'\"" and text[-1:] == text[:1]:  # A KeyError's message, quoted by its repr.
      text = ast.literal_eval(text)
    text = re.sub(r"\s*Did you mean", "; did you mean", _one_line(text))
    raise errors.ConfigError(f"bad --config override: {text} (every field is listed in "
                             "configs/ldm_f8.py)") from None


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
  """`parse_flags` for absl's app.run: a mistake is one line on stderr and exit 2."""
  try:
    return parse_flags(argv)
  except errors.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


def report(error: errors.Error) -> int:
  """Logs and prints `error` as one line; returns its exit code."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if isinstance(error, errors.Preempted):
    at = f"checkpoint saved at step {error.step}" if error.step is not None else "nothing to save"
    print(f"preempted: {at}; rerun the same command to resume", file=sys.stderr)
  else:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
  return error.exit_code


def run(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run(main)` with one-line errors and the exit codes of `vae_scale.errors`."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def wrapped(argv: list[str]) -> int:
    try:
      return main(argv) or 0
    except errors.Error as e:
      return report(e)

  app.run(wrapped, flags_parser=_parse_flags_or_exit)


def main_module_flags(define: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Calls a tool's `define_flags` and lists its flags under `--help` of the entry module.

  A tool's code lives in `vae_scale.tools.X` and runs from the thin `python -m vae_scale.X` entry
  module, which absl treats as the main module: its usage text and `--help` would otherwise show
  neither the tool's docstring nor its flags.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  holders = define()
  main = sys.modules.get("__main__")
  module = sys.modules.get(getattr(define, "__module__", ""))
  if main is not None and module is not None:
    main.__doc__ = module.__doc__
  for holder in holders.values():
    flag = flags.FLAGS[holder.name]
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  return holders


def usage_error(message: str) -> errors.ConfigError:
  """A command-line mistake (a missing flag, a stray argument): one line, exit 2."""
  return errors.ConfigError(message)
