"""run.checkpoints: what a checkpoint holds, the one listing of a workdir's checkpoints, and the
readers behind evaluate, encode and export (no compile: numpy trees stand in for a train state)."""

import json
import os

import numpy as np
import pytest

from conftest import random_params
from conftest import small_autoencoder_config
from conftest import tiny_config
from vae_scale.config import serialize
from vae_scale.data import sampler
from vae_scale.errors import ConversionError
from vae_scale.run import checkpoints

MODEL = small_autoencoder_config()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with checkpoints 2 and 4 of {step, params, ema_params}, and a half-written save."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(max_checkpoints_to_keep=5)
  manager = checkpoints.create_manager(workdir, config)
  position = sampler.DataPosition(0, 0, 8, "Test()", 0)
  for step in (2, 4):
    state = {"step": np.int32(step), "params": random_params(MODEL, seed=step),
             "ema_params": random_params(MODEL, seed=10 + step)}
    checkpoints.save(manager, step, state, position, config)
  manager.wait_until_finished()
  manager.close()
  os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1"))
  return workdir, config


def test_list_steps_lists_committed_checkpoints_only(run, tmp_path):
  workdir, _ = run
  assert checkpoints.list_steps(workdir) == [2, 4]
  assert checkpoints.list_steps(tmp_path / "nothing") == []


def test_each_checkpoint_stores_its_config_and_data_position(run):
  workdir, config = run
  stored = checkpoints.stored_config(checkpoints.directory(workdir), 4)
  assert stored == serialize.from_json(serialize.to_json(config))
  record = checkpoints.data_record_dir(checkpoints.directory(workdir), 4) / "metadata"
  assert sampler.examples_from_record(json.loads(record.read_text()), "x") == 32


def test_read_params_takes_ema_weights_when_the_run_keeps_them(run):
  workdir, _ = run
  params, step, which = checkpoints.read_params(workdir, MODEL)
  assert (step, which) == (4, "ema")
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"],
                                random_params(MODEL, seed=14)["decoder"]["conv_out"]["kernel"])
  params, step, which = checkpoints.read_params(workdir, MODEL, step=2, weights="params")
  assert (step, which) == (2, "params")
  np.testing.assert_array_equal(params["encoder"]["conv_in"]["bias"],
                                random_params(MODEL, seed=2)["encoder"]["conv_in"]["bias"])


def test_readers_say_what_is_missing_in_one_line(run, tmp_path):
  workdir, _ = run
  with pytest.raises(ConversionError, match=r"has no checkpoint of step 3; it has \[2, 4\]"):
    checkpoints.read_state(workdir, 3)
  with pytest.raises(ConversionError, match="has no checkpoints/"):
    checkpoints.read_state(str(tmp_path))
  with pytest.raises(ConversionError, match="don't match the model config"):
    checkpoints.read_params(workdir, small_autoencoder_config(ch=16))


# --------------------------------------------------------------------------- keeping the best


@pytest.mark.slow
def test_keep_best_keeps_the_best_evaluated_checkpoint_and_step_best_reads_it(tmp_path):
  from vae_scale.eval import report  # pylint: disable=g-import-not-at-top
  from vae_scale.run import loop  # pylint: disable=g-import-not-at-top
  from vae_scale.tools import evaluate  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"num_train_steps": 8, "checkpoint_every_steps": 100,
                          "eval_every_steps": 2, "image_every_steps": 100,
                          "max_checkpoints_to_keep": 1, "checkpoint.keep_best": "eval/l1",
                          "optimizer.learning_rate": 0.02})
  loop.train_and_evaluate(config, workdir)
  history = {r["step"]: r["l1"] for r in report.read_history(workdir) if r["step"]}
  best = min(history, key=history.get)  # Lower L1 is better.
  kept = checkpoints.list_steps(workdir)
  assert kept == sorted({best, 8}), (kept, history)  # The latest, the best; the rest deleted.
  assert checkpoints.best_step(workdir) == best
  result = evaluate.run(config, workdir, step="best", output_dir=str(tmp_path / "eval"))
  assert result["step"] == best
  assert result["l1"] == pytest.approx(history[best], rel=1e-5)
