"""Configs as dotted keys: flatten, compare, set, and read back from a run's config.json."""

import json

import ml_collections
import pytest

from ser_jax import config_tree
from ser_jax.config import ConfigError, default_config


def _tree():
  return ml_collections.ConfigDict(
    {"seed": 0, "train": {"num_epochs": 40, "shares": (1, 2)}, "loss": {"name": "focal"}}
  )


def test_flatten_names_every_leaf_by_its_path_and_json_lists_as_tuples():
  assert config_tree.flatten(_tree()) == {
    "seed": 0,
    "train.num_epochs": 40,
    "train.shares": (1, 2),
    "loss.name": "focal",
  }
  as_json = json.loads(_tree().to_json())
  assert config_tree.flatten(as_json) == config_tree.flatten(_tree())
  assert config_tree.flatten(as_json, skip=("train",)) == {"seed": 0, "loss.name": "focal"}


def test_changed_keys_lists_differences_and_keys_one_side_lacks_but_not_ignored_ones():
  before, after = _tree(), _tree()
  after.train.num_epochs = 3
  after.loss.name = "softmax"
  with after.unlocked():
    after.loss.gamma = 2.0
  assert config_tree.changed_keys(before, after) == ["loss.gamma", "loss.name", "train.num_epochs"]
  assert config_tree.changed_keys(before, after, ignore=["loss.name"]) == [
    "loss.gamma",
    "train.num_epochs",
  ]
  assert config_tree.changed_keys(before, json.loads(before.to_json())) == []


def test_set_key_sets_by_path_and_names_the_nearest_key_of_a_misspelt_one():
  config = default_config()
  config_tree.set_key(config, "train.num_epochs", 7, "here")
  config_tree.set_key(config, "data.class_shares", [1, 2, 3, 4], "here")
  assert config.train.num_epochs == 7 and config.data.class_shares == (1, 2, 3, 4)
  with pytest.raises(
    ConfigError,
    match=r"here: unknown config key 'train\.num_epoch'; did you mean train\.num_epochs",
  ):
    config_tree.set_key(config, "train.num_epoch", 7, "here")
  with pytest.raises(ConfigError, match=r"here: train\.num_epochs='many' is not allowed"):
    config_tree.set_key(config, "train.num_epochs", "many", "here")


def test_a_config_read_back_from_json_is_the_config_and_defaults_fill_what_it_lacks(tmp_path):
  config = default_config()
  config.train.num_epochs = 3
  config.data.classes = ("anger", "neutral")
  written = json.loads(config.to_json_best_effort())
  del written["train"]["weight_decay"]  # As a run made before the key existed.
  (tmp_path / "config.json").write_text(json.dumps(written))
  read = config_tree.from_json(tmp_path / "config.json", default_config())
  assert read.train.num_epochs == 3 and read.data.classes == ("anger", "neutral")
  assert read.train.weight_decay == default_config().train.weight_decay
  assert config_tree.changed_keys(read, config) == []
