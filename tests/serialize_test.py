"""config.serialize: a config through the JSON stored with each checkpoint and back, flattened."""

import ml_collections
import pytest

from conftest import load_config
from vae_scale.config import serialize
from vae_scale.errors import ConfigError
from vae_scale.run import reconcile


@pytest.mark.parametrize("name", ["ldm_f8", "demo", "tiny_config"])
def test_config_json_round_trip(name):
  config = load_config(name)
  text = serialize.to_json(config)
  back = serialize.from_json(text)
  assert back["model"]["ch_mult"] == list(config.model.ch_mult)
  assert reconcile.diff(back, config) == []
  rebuilt = serialize.from_dict(back)
  assert rebuilt.model.ch_mult == tuple(config.model.ch_mult)
  assert rebuilt.to_dict() == config.to_dict()
  assert serialize.to_json(rebuilt) == text


def test_config_json_resolves_references_and_placeholders():
  config = ml_collections.ConfigDict()
  config.a = ml_collections.FieldReference(3)
  config.b = config.get_ref("a") * 2
  config.c = ml_collections.config_dict.placeholder(int)
  config.d = ((1, 2), (3,))
  back = serialize.from_json(serialize.to_json(config))
  assert back == {"a": 3, "b": 6, "c": None, "d": [[1, 2], [3]]}


def test_config_from_json_rejects_garbage():
  with pytest.raises(ConfigError, match="not valid JSON"):
    serialize.from_json("{oops")
  with pytest.raises(ConfigError, match="not a JSON object"):
    serialize.from_json("[1, 2]")


def test_flatten_names_every_leaf_of_a_config_or_a_stored_dict_alike():
  config = load_config("tiny_config")
  flat = serialize.flatten(config)
  assert flat["model.ch_mult"] == [1, 2] and flat["disc.enabled"] is False
  assert serialize.flatten(serialize.from_json(serialize.to_json(config))) == flat
  assert serialize.flatten({"a": {}, "b": {"c": 1}}) == {"a": {}, "b.c": 1}  # Empty dicts: leaves.
