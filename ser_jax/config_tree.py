"""A config as a tree of dotted keys: flatten it, diff two, overlay overrides, read one back.

Every entry point and the study handle configs through these functions: `--config.<key>=`
overrides, a study's settings, a rerun's check against the config.json a run wrote, and
`predict`'s reading of that file. A config is an ml_collections ConfigDict or, as a run's
config.json holds it, the nested dict of its JSON.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from ser_jax.config import ConfigError

Tree = ml_collections.ConfigDict | Mapping


def _is_group(value) -> bool:
  return isinstance(value, ml_collections.ConfigDict | Mapping)


def _tuples(value):
  """Lists (as JSON gives them) as tuples (as configs hold them), nested ones too."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def flatten(tree: Tree) -> dict[str, Any]:
  """{'group.key': value} of every leaf, lists as tuples; an empty group is a leaf {}."""
  out = {}
  for name, value in tree.items():
    if _is_group(value) and len(value):
      out.update({f"{name}.{key}": v for key, v in flatten(value).items()})
    else:
      out[name] = {} if _is_group(value) else _tuples(value)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The nested dict of {'group.key': value}: {'group': {'key': value}}."""
  out: dict = {}
  for key, value in flat.items():
    *groups, name = key.split(".")
    node = out
    for group in groups:
      node = node.setdefault(group, {})
    node[name] = value
  return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def without(tree: Tree, keys: Iterable[str]) -> dict[str, Any]:
  """flatten(tree) without `keys` and the keys under them."""
  keys = tuple(keys)
  return {key: value for key, value in flatten(tree).items() if not _under(key, keys)}


def diff(a: Tree, b: Tree, ignore: Iterable[str] = ()) -> list[str]:
  """The sorted dotted keys whose values differ between two configs (or are in one only),
  apart from the keys in `ignore` and those under them."""
  flat_a, flat_b = without(a, ignore), without(b, ignore)
  missing = object()
  return sorted(
    key
    for key in flat_a.keys() | flat_b.keys()
    if flat_a.get(key, missing) != flat_b.get(key, missing)
  )


def known_keys(config: Tree) -> list[str]:
  """Every dotted key of `config`: its leaves and the groups above them."""
  keys = set()
  for key in flatten(config):
    parts = key.split(".")
    keys.update(".".join(parts[: n + 1]) for n in range(len(parts)))
  return sorted(keys)


def unknown_key_error(config: Tree, key: str, where: str = "") -> ConfigError:
  """ConfigError for `key`, which `config` lacks, naming the nearest key it has."""
  nearest = difflib.get_close_matches(key, known_keys(config), n=1, cutoff=0.6)
  hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
  return ConfigError(f"{where + ': ' if where else ''}unknown config key '{key}'{hint}")


def check_key(config: Tree, key: str, where: str = "") -> None:
  """Raises unknown_key_error unless `key` names a key or a group of `config`."""
  node = config
  for part in key.split("."):
    if not (_is_group(node) and part in node):
      raise unknown_key_error(config, key, where)
    node = node[part]


def value(config: Tree, key: str):
  """The value of dotted `key` in `config`; unknown_key_error if it has none."""
  check_key(config, key)
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def overlay(
  config: ml_collections.ConfigDict,
  overrides: Mapping[str, Any],
  where: str = "",
  *,
  new_keys: bool = False,
) -> ml_collections.ConfigDict:
  """Sets each dotted key of `overrides` on `config` (in place; returned too), in order.

  ConfigError names a key `config` lacks (and its nearest key) or a value its type refuses;
  with `new_keys` a missing key or group is made instead (config must then be unlocked).
  """
  for key, value in overrides.items():
    if not new_keys:
      check_key(config, key, where)
    *groups, name = key.split(".")
    node = config
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    try:
      node[name] = _tuples(value)
    except (TypeError, ValueError) as error:
      raise ConfigError(
        f"{where + ': ' if where else ''}{key}={value!r} is not allowed ({error})"
      ) from None
  return config


def read_config(
  path: str | os.PathLike, defaults: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """A run's config.json over `defaults` (changed in place), which then fill only the keys
  that a run made by an older ser_jax did not have; keys the defaults lack are kept."""
  values = json.loads(pathlib.Path(path).read_text())
  with defaults.unlocked():
    overlay(defaults, flatten(values), new_keys=True)
  return defaults
