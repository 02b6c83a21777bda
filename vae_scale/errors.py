"""The one error hierarchy of vae_scale: each class carries the exit code the command lines use.

Library code raises these; `vae_scale.cli.run` turns any of them into one line on stderr and the
class's exit code, so every tool (train, evaluate, encode, convert, bench) agrees on what the codes
mean: 0 done · 2 bad config, data or weights, or a workdir another run holds (nothing compiled,
nothing lost) · 3 diverged (rollbacks used up or too many non-finite steps) · 42 preempted (rerun
the same command).
"""

from __future__ import annotations

BAD_INPUT_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
PREEMPTED_EXIT_CODE = 42
# What each code means, for launchers' messages (shell scripts in launch/ name the same codes).
EXIT_MEANINGS = {0: "finished",
                 BAD_INPUT_EXIT_CODE: "bad config, data or weights, or a workdir in use",
                 NONFINITE_EXIT_CODE: "diverged: rollbacks used up or too many non-finite steps",
                 PREEMPTED_EXIT_CODE: "preempted, checkpoint saved"}


class Error(Exception):
  """Base class: a failure the user can act on. The message says what and what to do."""

  exit_code: int = 1


class ConfigError(Error, ValueError):
  """A config field is invalid; the message is `config.FIELD: rule`."""

  exit_code = BAD_INPUT_EXIT_CODE


class DataError(Error, ValueError):
  """The data a config points at cannot be used. The message names the path and what to do."""

  exit_code = BAD_INPUT_EXIT_CODE


class ConversionError(Error, ValueError):
  """Weights that cannot be converted or loaded. The message names the file and what to do."""

  exit_code = BAD_INPUT_EXIT_CODE


class LeaseError(Error, RuntimeError):
  """The workdir's lease is held by another live run, or this run lost it to another. The message
  names the holder and what to do; rerunning the same command would meet the same holder."""

  exit_code = BAD_INPUT_EXIT_CODE


class Diverged(Error, RuntimeError):
  """Training went wrong in a way a rerun would repeat: the guard's rollbacks are used up (or it
  is off and too many consecutive steps were non-finite). The message names the steps."""

  exit_code = NONFINITE_EXIT_CODE


class NonFiniteError(Diverged):
  """Too many consecutive steps had a non-finite loss or gradient (the guard off)."""


class Preempted(Error):
  """A SIGTERM or preemption notice arrived; whatever progress there was is saved. Rerun."""

  exit_code = PREEMPTED_EXIT_CODE

  def __init__(self, step: int | None = None):
    super().__init__(step)
    self.step = step
