"""A run config as plain data: flattened to dotted names, and to / from the JSON stored with each
checkpoint (`checkpoints/STEP/config/`)."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from vae_scale.errors import ConfigError


def plain(value: Any) -> Any:
  """JSON-ready copy: ConfigDicts and dicts as dicts, tuples as lists, references resolved,
  numpy scalars as Python numbers; values JSON cannot hold become their str()."""
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    value = value.to_dict()
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return value.item() if callable(getattr(value, "item", None)) else str(value)


def flatten(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  """{'model.ch': 128, 'model.ch_mult': [1, 2, 4, 4], ...}: every leaf of a config (or a stored
  config dict) under its dotted name, as `plain` values (tuples as lists)."""
  out = {}

  def walk(tree: dict[str, Any], prefix: str) -> None:
    for key, value in tree.items():
      if isinstance(value, dict) and value:
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(plain(config), "")
  return out


def to_json(config: ml_collections.ConfigDict | dict[str, Any]) -> str:
  """The config as JSON text to store with a checkpoint (tuples as lists, references resolved,
  placeholders as null)."""
  return json.dumps(plain(config), sort_keys=True, indent=1)


def from_json(text: str) -> dict[str, Any]:
  """Parses `to_json` output back into a nested dict.

  Raises:
    ConfigError: the text is not a JSON object.
  """
  try:
    value = json.loads(text)
  except ValueError as e:
    raise ConfigError(f"the stored run config is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ConfigError(f"the stored run config is a {type(value).__name__}, not a JSON object")
  return value


def from_dict(stored: dict[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from a stored config dict, with lists turned back into tuples."""
  tuplify = lambda v: (tuple(tuplify(x) for x in v) if isinstance(v, list) else
                       {k: tuplify(x) for k, x in v.items()} if isinstance(v, dict) else v)
  return ml_collections.ConfigDict(tuplify(plain(stored)))
