"""A config as dotted keys: flattened, diffed, overlaid and read back from a run's config.json."""

from __future__ import annotations

import json

import ml_collections
import pytest

from ser_jax import config_tree
from ser_jax.config import ConfigError, default_config
from ser_jax.predict import load_run_config


def _small():
  return ml_collections.ConfigDict(
    {"loss": {"name": "focal", "gamma": 2.0}, "data": {"classes": ("a", "b")}, "seed": 0}
  )


def test_flatten_names_every_leaf_by_its_dotted_key():
  assert config_tree.flatten(_small()) == {
    "data.classes": ("a", "b"),
    "loss.gamma": 2.0,
    "loss.name": "focal",
    "seed": 0,
  }
  # JSON's lists are a config's tuples; an empty group stays a key.
  assert config_tree.flatten({"a": {"b": [1, [2, 3]]}, "c": {}}) == {"a.b": (1, (2, 3)), "c": {}}
  assert config_tree.unflatten({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_every_default_key_is_flattened():
  config = default_config()
  flat = config_tree.flatten(config)
  expected = {
    f"{group}.{key}" if isinstance(values, dict) else group
    for group, values in config.to_dict().items()
    for key in (values if isinstance(values, dict) else [None])
  }
  assert set(flat) == expected
  assert flat["train.num_epochs"] == config.train.num_epochs


def test_diff_names_changed_added_and_removed_keys_apart_from_ignored_ones():
  a = _small()
  b = json.loads(a.to_json())  # The same config as JSON: lists, not tuples.
  assert config_tree.diff(a, b) == []
  b["loss"]["gamma"] = 0.5
  b["data"]["extra"] = 1
  del b["seed"]
  assert config_tree.diff(a, b) == ["data.extra", "loss.gamma", "seed"]
  assert config_tree.diff(a, b, ignore=["data", "seed"]) == ["loss.gamma"]
  # A prefix of a name is not a group: 'loss.gam' ignores nothing.
  assert config_tree.diff(a, b, ignore=["loss.gam"]) == ["data.extra", "loss.gamma", "seed"]


def test_overlay_sets_dotted_keys_and_names_the_nearest_key_of_a_misspelt_one():
  config = default_config()
  config_tree.overlay(config, {"loss.gamma": 0.5, "data.classes": ["x", "y"], "seed": 3})
  assert (config.loss.gamma, config.data.classes, config.seed) == (0.5, ("x", "y"), 3)
  with pytest.raises(ConfigError, match=r"^setting 'f': unknown config key 'loss\.gama'; "):
    config_tree.overlay(config, {"loss.gama": 1.0}, "setting 'f'")
  with pytest.raises(ConfigError, match=r"did you mean 'train\.num_epochs'\?$"):
    config_tree.overlay(config, {"train.num_epoch": 3})
  with pytest.raises(ConfigError, match=r"unknown config key 'zzz'$"):  # Nothing near.
    config_tree.overlay(config, {"zzz": 3})
  with pytest.raises(ConfigError, match=r"train\.num_epochs='ten' is not allowed"):
    config_tree.overlay(config, {"train.num_epochs": "ten"})
  assert config.train.num_epochs == default_config().train.num_epochs


def test_a_run_config_reads_back_as_it_was_written(tmp_path):
  config = default_config()
  config.loss.alpha = "inverse_frequency"
  config.data.class_shares = (4, 1, 3, 2)
  config.train.num_epochs = 7
  values = json.loads(config.to_json_best_effort())
  del values["train"]["models_per_program"]  # A key an older ser_jax did not have.
  (tmp_path / "config.json").write_text(json.dumps(values))
  read = load_run_config(tmp_path)
  assert read.to_dict() == config.to_dict()  # The missing key is the default's.
  assert isinstance(read.data.class_shares, tuple)


def test_a_key_the_defaults_lack_is_kept_when_read_back(tmp_path):
  values = json.loads(default_config().to_json_best_effort())
  values["train"]["from_a_newer_version"] = 1
  (tmp_path / "config.json").write_text(json.dumps(values))
  assert (
    config_tree.read_config(tmp_path / "config.json", default_config()).train[
      "from_a_newer_version"
    ]
    == 1
  )
