"""run.reconcile: config changes at resume with the real configs (no compiles)."""

from __future__ import annotations

import json

import ml_collections
import pytest

from conftest import load_config
from conftest import with_overrides
from vae_scale.config import serialize
from vae_scale.run import reconcile
from vae_scale.run import resume_log
from vae_scale.errors import ConfigError


def _stored(name: str = "ldm_f8", **overrides) -> dict:
  """A config as the checkpoint stores it: through JSON and back."""
  return serialize.from_json(serialize.to_json(_config(name, **overrides)))


def _config(name: str = "ldm_f8", **overrides) -> ml_collections.ConfigDict:
  return with_overrides(load_config(name), sep="__", **overrides)


def _resume(old: dict, new: ml_collections.ConfigDict, step: int = 8) -> reconcile.Plan:
  return reconcile.reconcile(old, new, step, workdir="/runs/a")


def test_unchanged_config_is_an_empty_plan():
  plan = _resume(_stored(), _config())
  assert plan.changes == () and plan.lines == () and not plan.reset_data


def test_diff_names_fields_and_absent_ones():
  old = _stored()
  del old["data"]["max_pixels"]
  old["legacy_field"] = 1
  changes = {c.field: c for c in reconcile.diff(old, _config(optimizer__b1=0.9))}
  assert set(changes) == {"data.max_pixels", "legacy_field", "optimizer.b1"}
  assert changes["data.max_pixels"].old is reconcile.ABSENT
  assert changes["legacy_field"].new is reconcile.ABSENT
  assert changes["data.max_pixels"].kind == "continue" and changes["data.max_pixels"].warn
  assert changes["optimizer.b1"].old == 0.5 and changes["optimizer.b1"].new == 0.9
  plan = reconcile.plan(list(changes.values()), 8, old, _config(optimizer__b1=0.9))
  assert any("data.max_pixels <absent> -> 178956970" in line for line in plan.lines)


def test_int_and_float_of_same_value_are_no_change():
  assert reconcile.diff(_stored(), _config(disc__weight=0.5, loss__l1_weight=1)) == []


def test_ema_turned_on():
  plan = _resume(_stored(ema_decay=0.0), _config(ema_decay=0.9))
  assert plan.ema_on and not plan.ema_off
  assert plan.lines == ("resume at step 8: ema_decay 0.0 -> 0.9: EMA turned on; the average "
                        "starts from the restored parameters",)


def test_ema_turned_off_and_decay_change():
  plan = _resume(_stored(), _config(ema_decay=0.0))
  assert plan.ema_off and not plan.ema_on
  assert "dropped from new checkpoints" in plan.lines[0]
  plan = _resume(_stored(), _config(ema_decay=0.999))
  assert not plan.ema_on and not plan.ema_off
  assert plan.changes[0].kind == "continue" and "average continues" in plan.lines[0]


def test_discriminator_switched():
  plan = _resume(_stored(), _config(disc__enabled=False))
  assert plan.disc_off and not plan.disc_on
  assert "state is dropped from new checkpoints" in plan.lines[0]
  plan = _resume(_stored("demo"), _config("demo", disc__enabled=True), step=250)
  assert plan.disc_on and not plan.warnings  # Before disc.start_step (50,001).
  assert "start from a fresh init" in plan.lines[0]
  plan = _resume(_stored("demo"), _config("demo", disc__enabled=True, disc__start_step=100), 250)
  assert plan.disc_on and any("trains from this step on" in w for w in plan.warnings)


def test_disc_architecture_only_matters_when_enabled_before_and_after():
  plan = _resume(_stored("demo"), _config("demo", disc__n_layers=2))  # Disc off in both.
  assert plan.changes[0].kind == "continue"
  plan = _resume(_stored("demo"), _config("demo", disc__enabled=True, disc__norm="group"))
  assert plan.disc_on
  with pytest.raises(ConfigError) as e:
    _resume(_stored(), _config(disc__filters=32))
  msg = str(e.value)
  assert "config.disc.filters: 64 -> 32" in msg
  assert "--config.init_from=/runs/a" in msg  # The autoencoder's weights still fit.


def test_freeze_switched():
  plan = _resume(_stored(), _config(freeze_encoder=True))
  assert plan.freeze_changed
  assert "encoder and quant_conv stop training" in plan.lines[0]
  plan = _resume(_stored(freeze_encoder=True), _config())
  assert plan.freeze_changed and "train again with Adam moments from zero" in plan.lines[0]


def test_vf_loss_switched_and_its_width_changed():
  on = _resume(_stored(loss__vf_weight=0.0), _config(loss__vf_weight=0.5))
  assert on.lines == ("resume at step 8: loss.vf_weight 0.0 -> 0.5: VF loss turned on; its 1x1 "
                      "projection and Adam moments start fresh",)
  assert on.changes[0].kind == "vf" and not on.warnings and not on.reset_data
  off = _resume(_stored(loss__vf_weight=0.5), _config(loss__vf_weight=0.0))
  assert "VF loss turned off; its projection is dropped from new checkpoints" in off.lines[0]
  # VA-VAE's stages change the weight and margins: the projection continues.
  stage = _resume(_stored(loss__vf_weight=0.5), _config(loss__vf_weight=0.1,
                                                       loss__vf_margin_cos=0.5))
  assert {c.kind for c in stage.changes} == {"continue"}
  assert "the projection continues" in stage.lines[1]
  width = _resume(_stored(loss__vf_weight=0.5), _config(loss__vf_weight=0.5,
                                                       loss__vf_feature_dim=768))
  assert width.changes[0].kind == "vf" and width.warnings == width.lines
  assert "now maps to DINOv2's width 768: it and its Adam moments start fresh" in width.lines[0]
  idle = _resume(_stored(), _config(loss__vf_feature_dim=768))  # VF off: no state involved.
  assert idle.changes[0].kind == "continue" and not idle.warnings
  # EQ-VAE's term keeps no state: switching it only changes the step.
  eq = _resume(_stored(), _config(loss__equivariance_weight=1.0))
  assert eq.changes[0].kind == "continue"


def test_architecture_change_is_one_line_naming_every_field():
  with pytest.raises(ConfigError) as e:
    _resume(_stored(), _config(model__ch=64, model__ch_mult=(1, 2, 4)))
  msg = str(e.value)
  assert "\n" not in msg
  assert "config.model.ch: 128 -> 64" in msg
  assert "config.model.ch_mult: (1, 2, 4, 4) -> (1, 2, 4)" in msg
  assert "run in /runs/a (checkpoint step 8); nothing was changed on disk" in msg
  assert "new --workdir" in msg
  assert "init_from cannot start from them" in msg  # Shapes differ: init_from would fail.


@pytest.mark.parametrize("override", [
    {"model__z_channels": 8}, {"model__double_z": False}, {"model__mid_attention": False},
    {"model__num_res_blocks": 3}, {"model__out_channels": 1},
    {"model__attn_resolutions": (32,)}, {"model__norm_groups": 16}])
def test_every_architecture_field_refuses(override):
  with pytest.raises(ConfigError, match="changes the architecture"):
    _resume(_stored(), _config(**override))


def test_norm_groups_suggests_init_from():
  with pytest.raises(ConfigError, match="--workdir=NEW --config.init_from=/runs/a"):
    _resume(_stored(), _config(model__norm_groups=16))


def test_image_size_and_attention():
  # No attention levels: the model is fully convolutional, a new crop size just continues.
  plan = _resume(_stored(), _config(image_size=128))
  assert plan.changes[0].kind == "continue" and not plan.reset_data
  # Attention at 32 px: at 256 that is level 3, at 128 level 2.
  with pytest.raises(ConfigError, match="config.image_size: 256 -> 128"):
    _resume(_stored(model__attn_resolutions=(32,)), _config(model__attn_resolutions=(32,),
                                                           image_size=128))
  # An attention resolution no level has is no change of the module tree.
  plan = _resume(_stored(), _config(model__attn_resolutions=(1024,)))
  assert plan.changes[0].kind == "continue"
  # Sample data is cut at the image size: its iterator state does not carry over.
  plan = _resume(_stored("demo"), _config("demo", image_size=32))
  assert plan.reset_data


def test_data_path_change_restarts_the_stream():
  old = _stored(data__path="/data/a")
  plan = _resume(old, _config(data__path="/data/b"))
  assert plan.reset_data and plan.changes[0].kind == "data"
  assert plan.warnings == plan.lines
  assert "data.path '/data/a' -> '/data/b'" in plan.lines[0]
  assert "data stream restarts from its beginning" in plan.lines[0]


def test_data_fields_depend_on_the_source():
  old = _stored(data__path="/d")
  assert _resume(old, _config(data__path="/d", data__tfds_name="x")).changes[0].kind == "continue"
  assert _resume(old, _config(data__path="/d", data__eval_fraction=0.1)).reset_data
  old = _stored(data__path="/d", data__eval_path="/e")
  plan = _resume(old, _config(data__path="/d", data__eval_path="/f"))
  assert not plan.reset_data and "eval metrics from here on are not comparable" in plan.lines[0]
  assert _resume(old, _config(data__path="/d")).reset_data  # eval_path removed: train set shrinks.
  old = _stored(data__source="tfds", data__tfds_name="imagenet2012")
  new = _config(data__source="tfds", data__tfds_name="imagenet2012")
  new.data.train_split = "train[:50%]"
  assert _resume(old, new).reset_data
  new.data.train_split, new.data.eval_split = "train", "validation[:10]"
  assert not _resume(old, new).reset_data
  assert _resume(_stored("demo"), _config("demo", data__source="synthetic")).reset_data


def test_num_workers_only_changes_decoding():
  for workers in (0, 4):
    plan = _resume(_stored(), _config(data__num_workers=workers))
    assert not plan.reset_data and not plan.warnings
    assert "data position and order are kept" in plan.lines[0]


def test_seed_restarts_the_data_with_a_warning():
  plan = _resume(_stored(data__path="/d"), _config(data__path="/d", seed=1))
  assert plan.reset_data and plan.warnings
  assert "random stream is saved in the checkpoint" in plan.lines[0]
  assert "held-out evaluation files change" in plan.lines[0]
  plan = _resume(_stored("demo"), _config("demo", seed=1))
  assert plan.reset_data and "held-out" not in plan.lines[0]


def test_global_batch_size_continues_with_a_warning():
  plan = _resume(_stored(), _config(global_batch_size=128))
  assert not plan.reset_data and plan.changes[0].kind == "continue"
  assert plan.warnings and "128 images instead of 64" in plan.lines[0]
  assert "4.5e-06 x 128 = 0.000576" in plan.lines[0]


def test_learning_rate_jump_warns():
  plan = _resume(_stored(), _config(optimizer__learning_rate=1e-4), step=1000)
  assert plan.learning_rates == pytest.approx((2.88e-4, 1e-4))
  assert plan.warnings and "jumps 0.000288 -> 0.0001 (-65.3%)" in plan.lines[0]


def test_cosine_schedule_length_change():
  # demo: cosine over 1200 steps; at step 600 the rate is about half the peak; over 2400 ~85%.
  plan = _resume(_stored("demo"), _config("demo", num_train_steps=2400), step=600)
  a, b = plan.learning_rates
  assert b > a and plan.warnings
  assert "num_train_steps 1200 -> 2400" in plan.lines[0] and "jumps" in plan.lines[0]


def test_no_warning_when_the_rate_at_the_step_is_the_same():
  plan = _resume(_stored(), _config(num_train_steps=2_000_000), step=1000)
  assert not plan.warnings and "stays 0.000288" in plan.lines[0]
  plan = _resume(_stored(), _config(optimizer__warmup_steps=10), step=1000)  # Warm-up is over.
  assert not plan.warnings


def test_plain_continue_fields():
  new = _config(loss__kl_weight=1e-6, model__dtype="bfloat16", model__remat="block",
                log_every_steps=10, optimizer__grad_clip_norm=1.0)
  plan = _resume(_stored(), new)
  assert {c.kind for c in plan.changes} == {"continue"}
  assert not (plan.warnings or plan.reset_data or plan.ema_on or plan.disc_on)
  assert len(plan.lines) == 5


def test_init_from_has_no_effect_on_a_resumed_run():
  plan = _resume(_stored(), _config(init_from="/weights/sd-vae"))
  assert plan.changes[0].kind == "continue"
  assert "no effect on a resumed run" in plan.lines[0]


def test_disc_start_step_crossing_the_resume_step():
  plan = _resume(_stored(), _config(disc__start_step=100_000), step=60_000)
  assert "pauses until step 100000" in plan.warnings[0]
  plan = _resume(_stored(), _config(disc__start_step=10), step=60)
  assert "the adversarial term starts at this step" in plan.warnings[0]
  plan = _resume(_stored(), _config(disc__start_step=60_000), step=100)  # Not active in either.
  assert not plan.warnings


def test_resume_log(tmp_path):
  old = _stored()
  plan = _resume(old, _config(ema_decay=0.0, data__path="/new"))
  reconcile.append_resume_log(tmp_path, 8, plan, clock=lambda: 123.0)
  reconcile.append_resume_log(tmp_path, 8, plan, enabled=False)
  path = tmp_path / resume_log.FILENAME
  entries = [json.loads(line) for line in path.read_text().splitlines()]
  assert [e["field"] for e in entries] == ["data.path", "ema_decay"]
  assert entries[1] == {"time": 123.0, "step": 8, "field": "ema_decay", "old": 0.9999, "new": 0.0,
                        "kind": "ema", "warn": False, "message": plan.lines[1]}
  assert entries[0]["kind"] == "data" and entries[0]["old"] == "" and entries[0]["warn"]
  plan2 = _resume(_stored(ema_decay=0.0), _config(ema_decay=0.5), step=16)
  reconcile.append_resume_log(tmp_path, 16, plan2)
  entries = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(entries) == 3 and entries[2]["step"] == 16 and entries[2]["kind"] == "ema"
  reconcile.append_resume_log(tmp_path, 20, _resume(old, _config()))  # No changes: no entry.
  assert len(path.read_text().splitlines()) == 3
  assert [p.name for p in tmp_path.iterdir()] == [resume_log.FILENAME]  # No temp file left.


def test_resume_log_absent_values(tmp_path):
  old = _stored()
  old["legacy_field"] = [1, 2]
  plan = _resume(old, _config())
  reconcile.append_resume_log(tmp_path, 8, plan)
  entry = json.loads((tmp_path / resume_log.FILENAME).read_text())
  assert entry["old"] == [1, 2] and entry["new"] == "<absent>"


def test_absent_step_dependent_fields_do_not_break_the_plan():
  old = _stored()
  del old["disc"]["start_step"], old["num_train_steps"]
  plan = _resume(old, _config(), step=60_000)
  assert [c.field for c in plan.changes] == ["disc.start_step", "num_train_steps"]
  assert len(plan.warnings) == 2 and plan.learning_rates is None
