"""Runs a few train steps and an evaluation on however many devices JAX sees; saves the outputs.

Used by test_sharding.py in subprocesses that simulate N CPU devices.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

from ser_jax import cpu, engine, evaluation, input_pipeline, models, programs, train
from ser_jax.config import default_config
from ser_jax.sharding import Topology
from ser_jax.store import FeatureStore


def tiny_store(n: int = 37, n_bins: int = 8, n_frames: int = 16) -> FeatureStore:
  rng = np.random.default_rng(0)
  labels = np.arange(n) % 4
  features = rng.normal(size=(n, n_bins, n_frames)).astype(np.float32) + labels[:, None, None]
  return FeatureStore(
    path=pathlib.Path("."),
    features=features,
    labels=labels.astype(np.int32),
    valid_frames=rng.integers(4, n_frames + 1, size=n).astype(np.int32),
    manifest=tuple({"speaker": str(i % 5), "group": str(i % 5)} for i in range(n)),
    meta={"class_names": ["a", "b", "c", "d"]},
  )


def main(out_path: str, n_steps: int, batch_size: int, eval_batch_size: int, layout: str) -> None:
  """`layout`: 'replicated', 'fsdp' (config.model.shard_params), 'sweep' (3 members) or
  'folds' (3 models of different folds, stacked, with their own batches on the device)."""
  config = default_config()
  config.model.shard_params = layout == "fsdp"
  config.train.batch_size = batch_size
  store = tiny_store()
  topology = Topology.create()
  eval_batch_size = topology.num_devices * -(-eval_batch_size // topology.num_devices)
  gammas = (0.0, 2.0, 5.0) if layout in ("sweep", "folds") else (2.0,)
  members = [engine.Member(gamma, 0, 1e-2) for gamma in gammas]
  k = len(members)
  # The same lowering on any number of devices, so that only the sharding differs.
  backend = cpu.backend("cpu")
  # Two stages of one block (a strided block with its projection among them): what a
  # sharding does to a ResNet, compiled in a fraction of ResNet-18's time. The FSDP layout
  # splits the second stage's 8-channel kernels.
  model = models.ResNet(stage_sizes=(1, 1), num_classes=4, width=4, **backend.ops)
  n_bins = store.features.shape[1]
  shapes = programs.Shapes(
    n_models=k,
    n_members=k,
    feature_shape=store.features.shape[1:],
    batch_size=batch_size,
    max_steps=n_steps,
    n_rows=len(store),
    eval_batches=-(-len(store) // eval_batch_size),
    eval_batch_size=eval_batch_size,
    n_classes=4,
  )
  made = programs.Programs.create(
    shapes,
    model,
    backend,
    programs.Options.from_config(config),
    topology,
  )
  folds = np.arange(k, dtype=np.int32) if layout == "folds" else np.zeros(k, np.int32)
  state = made.init(np.zeros(k, np.uint32), folds)
  if layout == "fsdp":  # Large enough leaves are split over the data axis.
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
  hparams = engine.stacked_hparams(config, members, None, 0, n_steps, tuple("abcd"))
  hparams = jax.device_put(hparams, topology.replicated)
  mean = np.zeros(n_bins, np.float32)
  std = np.ones_like(mean)
  indices = np.arange(len(store))
  losses = []
  if layout == "folds":  # Each model its own batches, and the last one step fewer.
    rows = jax.device_put(input_pipeline.load_rows(store), topology.replicated)
    order = np.stack(
      [np.random.default_rng(m).choice(indices, (n_steps, batch_size)) for m in range(k)]
    ).astype(np.int32)
    n_trained = np.array([n_steps] * (k - 1) + [n_steps - 1], np.int32)
    state, metrics = made.train_epoch(
      state,
      rows,
      *jax.device_put((order, n_trained, np.stack([mean] * k), np.stack([std] * k))),
      hparams,
    )
    losses = np.asarray(metrics["loss"]).T  # [steps, models]
    assert np.asarray(state.step).tolist() == n_trained.tolist()
  else:
    for step in range(n_steps):
      batch = input_pipeline.read_batch(
        store, np.random.default_rng(step).choice(indices, batch_size, replace=False), mean, std
      )
      state, metrics = made.train_step(state, topology.global_batch(batch), hparams)
      losses.append(np.asarray(metrics["loss"]))
  probabilities = evaluation.evaluate(
    made.evaluate, made.take_cell(state, 0), store, indices, mean, std, shapes, topology
  )
  # Each test example alone through plain Flax's ResNet on the host: no batch, padding or
  # sharding (inference BatchNorm makes an example's output its own).
  cell = jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(made.take_cell(state, 0)))
  variables = {"params": cell.params, "batch_stats": cell.batch_stats}
  flax_model = models.ResNet(stage_sizes=(1, 1), num_classes=4, width=4)
  one_at_a_time = [
    train.class_probabilities(
      flax_model.apply,
      variables,
      input_pipeline.read_batch(store, indices[i : i + 1], mean, std)["features"],
    )[0]
    for i in indices
  ]
  leaves = {f"param_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state.params))}
  stats = {f"stat_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state.batch_stats))}
  np.savez(
    out_path,
    losses=np.array(losses),
    probabilities=probabilities,
    one_at_a_time=np.array(one_at_a_time),
    n_devices=jax.device_count(),
    **leaves,
    **stats,
  )


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
