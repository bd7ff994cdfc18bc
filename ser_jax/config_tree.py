"""Configs as trees of dotted keys: flatten, compare, set by key, and read back from JSON.

A config's keys are dotted paths (`train.num_epochs`, `seed`). `main`, `study`, `predict`
and the experiment's rerun check all go through these functions.
"""

from __future__ import annotations

import difflib
import json
import pathlib
from collections.abc import Iterable, Mapping

import ml_collections

from ser_jax.config import ConfigError


def _tuples(value):
  """Lists as tuples, all the way down (JSON has no tuples; configs' sequences are tuples)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def flatten(tree: ml_collections.ConfigDict | Mapping, skip: Iterable[str] = ()) -> dict:
  """{'group.key': value} of a config or its JSON, sequences as tuples; `skip` drops
  top-level groups."""
  skip, flat = set(skip), {}

  def walk(node, prefix: str) -> None:
    for name, value in node.items():
      if not prefix and name in skip:
        continue
      if isinstance(value, ml_collections.ConfigDict | Mapping):
        walk(value, f"{prefix}{name}.")
      else:
        flat[f"{prefix}{name}"] = _tuples(value)

  walk(tree, "")
  return flat


def changed_keys(before, after, ignore: Iterable[str] = ()) -> list[str]:
  """The dotted keys whose values differ between two configs (or their JSON), sorted."""
  ignore = set(ignore)
  flat_before, flat_after = flatten(before), flatten(after)
  return sorted(
    key
    for key in flat_before.keys() | flat_after.keys()
    if key not in ignore and flat_before.get(key) != flat_after.get(key)
  )


def check_key(config: ml_collections.ConfigDict, key: str, where: str) -> None:
  """Raises ConfigError naming `where` and the nearest keys when `key` is not in `config`."""
  keys = flatten(config)
  if key not in keys:
    near = difflib.get_close_matches(key, keys, n=3)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


def set_key(config: ml_collections.ConfigDict, key: str, value, where: str) -> None:
  """config[key] = value for a dotted key; ConfigError names `where` for an unknown key or
  a value of the wrong type."""
  check_key(config, key, where)
  *groups, name = key.split(".")
  node = config
  for group in groups:
    node = node[group]
  try:
    node[name] = _tuples(value)
  except (TypeError, ValueError) as error:
    raise ConfigError(f"{where}: {key}={value!r} is not allowed ({error})") from None


def from_json(path: pathlib.Path, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run's config.json over `defaults`, which fill only the keys an older run lacks (keys
  a newer run has that `defaults` lacks are kept too)."""
  config = defaults
  with config.unlocked():
    _overlay(config, json.loads(pathlib.Path(path).read_text()))
  return config


def _overlay(config: ml_collections.ConfigDict, values: Mapping) -> None:
  for key, value in values.items():
    if isinstance(value, Mapping) and isinstance(config.get(key), ml_collections.ConfigDict):
      _overlay(config[key], value)
    else:
      config[key] = _tuples(value)
