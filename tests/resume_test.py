"""Resume planning: the data position, and config changes at resume on real checkpoints."""

import json

import pytest

from conftest import tiny_config
from vae_scale.run import checkpoints
from vae_scale.run import resume
from vae_scale.data import pipeline
from vae_scale.data import sampler
from vae_scale.errors import DataError


# --------------------------------------------------------------------------- data position


def test_the_data_position_record_resumes_at_its_global_example(tmp_path, caplog):
  position = sampler.DataPosition(step=4, global_examples=32, global_batch_size=8,
                                  source="SyntheticSource(...)", seed=0)
  record = position.record(10)  # 6 more steps of 8 after the position was taken at step 4.
  assert record["global_examples"] == 80 and record["format"] == "vae_scale.data_position"
  (tmp_path / "metadata").write_text(json.dumps(record))  # Where Orbax's JsonSave writes it.
  config = tiny_config(global_batch_size=16)  # Resumed with another global batch: same example.
  assert resume.data_start(tmp_path, 10, config, data_source="SyntheticSource(...)") == 80
  assert not caplog.text
  with caplog.at_level("WARNING"):
    assert resume.data_start(tmp_path, 10, config, data_source="FolderSource(...)") == 80
  assert "the train source is now FolderSource" in caplog.text
  (tmp_path / "metadata").write_text(json.dumps(dict(record, version=2)))
  with pytest.raises(DataError, match="format version 2"):
    resume.data_start(tmp_path, 10, config)
  (tmp_path / "metadata").write_text('{"format": "vae_scale.data_posi')  # Damaged: not a refusal.
  with pytest.raises(ValueError):
    resume.data_start(tmp_path, 10, config)


def test_grain_iterator_states_of_older_checkpoints_resume_on_any_process_count(tmp_path, caplog):
  # What vae_scale wrote before elastic data: one Grain iterator state per process.
  for name in ("process_0-of-2.json", "process_1-of-2.json"):
    (tmp_path / name).write_text(json.dumps({"parent": {}, "tried": 0, "bad": 0}))
  assert resume.grain_state_process_count(tmp_path) == 2
  assert resume.grain_state_process_count(tmp_path / "absent") is None
  config = tiny_config(global_batch_size=8)
  with caplog.at_level("WARNING"):
    # The stored config's global batch (4) counts the steps the old run took.
    start = resume.data_start(tmp_path, 6, config, {"global_batch_size": 4})
  assert start == 24
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1, lines
  assert ("Grain's iterator states of 2 processes" in lines[0] and "global example 24" in lines[0]
          and "differ from the ones the old run would have read" in lines[0])
  assert resume.data_start(tmp_path / "absent", 6, config) == 48  # No data item at all.


# --------------------------------------------------------------------------- config changes at resume
#
# A base run trains 2 steps; each case restores its checkpoint under a changed config with the one
# restore the loop uses, and checks the restored parts bit for bit.

import hashlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vae_scale import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.training import programs  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.run import resume_log  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.run import state_tree  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.run import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from vae_scale.errors import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position

_GAN = {"disc.enabled": True, "disc.filters": 8, "disc.n_layers": 2, "disc.start_step": 0,
        "image_size": 32, "ema_decay": 0.9}


def _base(**kw):
  return tiny_config(**{"num_train_steps": 2, "checkpoint_every_steps": 2, **kw})


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
  """2 steps without EMA or discriminator; returns (workdir, its stored state as numpy)."""
  workdir = str(tmp_path_factory.mktemp("plain"))
  loop.train_and_evaluate(_base(), workdir)
  return workdir, checkpoints.read_state(workdir, 2)[0]


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
  """2 steps with EMA and the discriminator on."""
  workdir = str(tmp_path_factory.mktemp("gan"))
  loop.train_and_evaluate(_base(**_GAN), workdir)
  return workdir, checkpoints.read_state(workdir, 2)[0]


def _copy(run, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(run, dst)
  return dst


def _restore(workdir, config):
  """The loop's restore under `config`: the stored state or None, the state to train, the data
  iterator; returns (state as numpy, step, data iterator, programs)."""
  mesh = sharding.create_mesh()
  model_cfg = models.AutoencoderConfig.from_config(config)
  frozen = (jax.tree.map(lambda t: not t, optim.trainable_mask(
      models.abstract_params(model_cfg), True)) if config.freeze_encoder else None)
  progs = programs.build(config, mesh, frozen=frozen)
  manager = checkpoints.create_manager(workdir, config)
  try:
    restored = resume.restore_latest(manager, config=config, workdir=workdir,
                                     abstract_state=progs.abstract_state,
                                     replicated=progs.replicated)
  finally:
    manager.close()
  state = resume.state_from(restored, progs.abstract_state, progs.init)
  position = resume.data_position(restored, config)
  data_iter = iter(pipeline.create_train_dataset(config, 0, 1, start=position.global_examples))
  return jax.tree.map(np.asarray, state), position.step, data_iter, progs


def _equal(a, b):
  """The same leaves under the same names (a live state's int keys are a stored one's strings)."""
  fa, fb = state_tree.flat(a), state_tree.flat(b)
  assert sorted(fa) == sorted(fb)
  for name, leaf in fa.items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(fb[name]), err_msg=name)


def _log(workdir):
  path = os.path.join(workdir, resume_log.FILENAME)
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


@pytest.mark.slow
def test_ema_turned_on_starts_the_average_from_the_restored_params(plain_run, tmp_path):
  workdir = _copy(plain_run[0], tmp_path)
  state, step, _, _ = _restore(workdir, _base(ema_decay=0.9))
  assert step == 2 and not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  _equal(state.params, plain_run[1]["params"])
  _equal(state.ema_params, plain_run[1]["params"])
  _equal(state.opt_state, plain_run[1]["opt_state"])
  assert [(e["field"], e["kind"]) for e in _log(workdir)] == [("ema_decay", "ema")]


@pytest.mark.slow
def test_discriminator_turned_on_is_fresh_and_the_autoencoder_restored(plain_run, tmp_path):
  workdir = _copy(plain_run[0], tmp_path)
  config = _base(**{k: v for k, v in _GAN.items() if k not in ("image_size", "ema_decay")})
  state, step, _, progs = _restore(workdir, config)
  assert step == 2
  _equal(state.params, plain_run[1]["params"])
  fresh = jax.tree.map(np.asarray, progs.init())
  _equal(state.disc_params, fresh.disc_params)
  _equal(state.disc_opt_state, fresh.disc_opt_state)
  assert ("disc.enabled", "disc") in [(e["field"], e["kind"]) for e in _log(workdir)]


@pytest.mark.slow
def test_ema_and_discriminator_turned_off_are_dropped(gan_run, tmp_path):
  workdir = _copy(gan_run[0], tmp_path)
  config = _base(**{"image_size": 32, "disc.filters": 8, "disc.n_layers": 2})
  state, step, _, _ = _restore(workdir, config)
  assert step == 2 and state.ema_params is None and state.disc_params is None
  _equal(state.params, gan_run[1]["params"])
  kinds = {e["field"]: e["kind"] for e in _log(workdir)}
  assert kinds["ema_decay"] == "ema" and kinds["disc.enabled"] == "disc"
  # The old checkpoint keeps what the new run drops.
  assert checkpoints.read_state(workdir, 2)[0]["ema_params"] is not None


@pytest.mark.slow
def test_freeze_encoder_switched_keeps_the_decoder_moments_and_resets_the_encoders(
    plain_run, tmp_path):
  workdir = _copy(plain_run[0], tmp_path)
  state, step, _, _ = _restore(workdir, _base(freeze_encoder=True))
  assert step == 2
  _equal(state.params, plain_run[1]["params"])
  got, stored = state_tree.flat(state.opt_state), state_tree.flat(plain_run[1]["opt_state"])
  assert sorted(got) == sorted(stored)
  moments = [n for n in got if "/mu/" in n or "/nu/" in n]
  encoder = [n for n in moments if any(f"/{side}/" in n for side in optim.ENCODER_SIDE)]
  assert encoder and len(encoder) < len(moments)
  for name in moments:
    if name in encoder:  # Reset: the encoder side's role changed (trained -> frozen).
      assert not np.any(got[name]), name
    else:  # Kept: the decoder trains on as before.
      np.testing.assert_array_equal(got[name], stored[name], err_msg=name)
  assert any(np.any(stored[n]) for n in encoder)


@pytest.mark.slow
def test_hyperparameters_continue_with_the_same_state_and_a_rate_jump_is_warned(
    plain_run, tmp_path, caplog):
  workdir = _copy(plain_run[0], tmp_path)
  config = _base(**{"optimizer.learning_rate": 1e-2, "optimizer.grad_clip_norm": 1.0,
                    "loss.ssim_weight": 0.5, "optimizer.name": "adamw"})
  with caplog.at_level("WARNING"):
    state, step, _, _ = _restore(workdir, config)
  assert step == 2
  _equal(state.params, plain_run[1]["params"])
  _equal(state.opt_state, plain_run[1]["opt_state"])
  assert any("optimizer.learning_rate" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_new_data_source_keeps_the_model_and_restarts_the_stream(plain_run, tmp_path):
  workdir = _copy(plain_run[0], tmp_path)
  config = _base(**{"data.synthetic_size": 32})
  state, step, data_iter, _ = _restore(workdir, config)
  assert step == 2
  _equal(state.params, plain_run[1]["params"])
  first = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  np.testing.assert_array_equal(next(data_iter)["image"], first["image"])
  assert [e["kind"] for e in _log(workdir)] == ["data"]


def _tree_digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      p = os.path.join(d, f)
      h.update(os.path.relpath(p, root).encode())
      h.update(open(p, "rb").read())
  return h.hexdigest()


@pytest.mark.slow
def test_an_architecture_change_is_refused_and_nothing_on_disk_changes(plain_run, tmp_path):
  workdir = _copy(plain_run[0], tmp_path)
  before = _tree_digest(os.path.join(workdir, "checkpoints"))
  with pytest.raises(ConfigError, match=r"config.model.ch: 4 -> 8 changes the architecture.*"
                     r"nothing was changed on disk.*new --workdir"):
    _restore(workdir, _base(**{"model.ch": 8}))
  assert _tree_digest(os.path.join(workdir, "checkpoints")) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


@pytest.mark.slow
def test_a_truncated_array_file_is_still_damage(plain_run, tmp_path, caplog):
  workdir = _copy(plain_run[0], tmp_path)
  config = _base(num_train_steps=4)
  loop.train_and_evaluate(config, workdir)  # Checkpoints 2 and 4.
  state4 = checkpoints.read_state(workdir, 4)[0]
  arrays = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "checkpoints", "4",
                                                                      "state"))
            for f in fs if os.path.basename(d) == "d" and os.path.getsize(os.path.join(d, f)) > 1000]
  assert arrays
  for path in arrays:  # Truncate every data file of checkpoint 4 to half.
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level("WARNING"):
    state, step, _, _ = _restore(workdir, config)
  assert step == 2
  assert any("step 4 is damaged" in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))[0].startswith("4-")
  _equal(state.params, plain_run[1]["params"])
  del state4


def test_graft_takes_a_stored_leaf_only_with_the_wanted_shape():
  """A new loss.vf_feature_dim: the stored projection (and its moments) of the old width is not
  carried over; the rest is."""
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  abstract = {"params": {"w": sds(2)}, "vf_proj": sds(4, 8), "opt_state": {"mu": sds(4, 8)}}
  restored = {"params": {"w": np.ones(2, np.float32)}, "vf_proj": np.ones((4, 16), np.float32),
              "opt_state": {"mu": np.ones((4, 16), np.float32)}}
  fresh = lambda: {"params": {"w": np.zeros(2, np.float32)}, "vf_proj": np.full((4, 8), 5.0),
                   "opt_state": {"mu": np.zeros((4, 8), np.float32)}}
  out = state_tree.graft(abstract, restored, fresh)
  np.testing.assert_array_equal(out["params"]["w"], np.ones(2))
  np.testing.assert_array_equal(out["vf_proj"], np.full((4, 8), 5.0))
  np.testing.assert_array_equal(out["opt_state"]["mu"], np.zeros((4, 8)))
