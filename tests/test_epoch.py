"""The epoch on the device: the same batches, in the same order, with the same bits as the
batches streamed from the store, and one program for folds of different sizes."""

import json
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_module, tiny_args

from ser_jax import input_pipeline, train

USER_OPTIMIZATION = "--xla_backend_optimization_level=3"  # XLA's default, after helpers' -O0.


def _fake_store(n=40, n_bins=6, n_frames=9, seed=0):
  rng = np.random.default_rng(seed)
  return types.SimpleNamespace(
    features=rng.normal(3.0, 2.0, (n, n_bins, n_frames)).astype(np.float32),
    labels=rng.integers(0, 4, n),
    valid_frames=rng.integers(1, n_frames + 1, n),
  )


def test_batch_indices_are_the_streamed_batches_in_order():
  store = _fake_store()
  indices = np.arange(3, 40)  # 37 examples: 4 batches of 8, 5 dropped.
  mean, std = np.zeros(6, np.float32), np.ones(6, np.float32)
  order = input_pipeline.batch_indices(indices, 8, seed=1, fold=2, epoch=3)
  assert order.shape == (4, 8)
  assert len(set(order.ravel())) == 32 and set(order.ravel()) <= set(indices)
  streamed = list(
    input_pipeline.train_batches(store, indices, 8, mean, std, seed=1, fold=2, epoch=3)
  )
  assert len(streamed) == 4
  for rows, batch in zip(order, streamed, strict=True):
    np.testing.assert_array_equal(batch["labels"], store.labels[rows])
    np.testing.assert_array_equal(batch["features"], store.features[rows])
  other_epoch = input_pipeline.batch_indices(indices, 8, seed=1, fold=2, epoch=4)
  assert not np.array_equal(order, other_epoch)


def test_a_batch_gathered_on_the_device_has_the_bits_of_one_read_on_the_host():
  store = _fake_store()
  mean, std = input_pipeline.normalisation_stats(store.features, np.arange(40), store.valid_frames)
  rows = jax.device_put(
    {"features": store.features, "labels": store.labels, "valid_frames": store.valid_frames}
  )
  indices = np.array([7, 0, 39, 7, 12])
  host = input_pipeline.read_batch(store, indices, mean, std)
  device = jax.jit(input_pipeline.device_batch)(rows, indices, mean, std)
  for name in ("features", "labels", "valid_frames"):
    np.testing.assert_array_equal(np.asarray(device[name]), host[name], err_msg=name)
  # And the standardisation is the textbook one, to float32 rounding.
  expected = (store.features[indices] - mean[:, None]) / std[:, None]
  np.testing.assert_allclose(host["features"], expected, rtol=1e-6, atol=1e-6)


def test_prefetch_keeps_order_reads_ahead_and_passes_errors_on():
  assert list(input_pipeline.prefetch(iter(range(7)), size=3)) == list(range(7))
  assert list(input_pipeline.prefetch(iter([]))) == []
  pulled, gate = [], threading.Event()

  def items():
    for i in range(5):
      pulled.append(i)
      yield i

  stream = input_pipeline.prefetch(items(), size=2)
  assert next(stream) == 0
  deadline = threading.Timer(5.0, gate.set)
  deadline.start()
  while len(pulled) < 3 and not gate.is_set():  # 0 taken, 1 and 2 prepared ahead.
    gate.wait(0.01)
  deadline.cancel()
  assert pulled[:3] == [0, 1, 2]
  assert list(stream) == [1, 2, 3, 4]

  def failing():
    yield 1
    raise OSError("disk gone")

  with pytest.raises(OSError, match="disk gone"):
    list(input_pipeline.prefetch(failing()))


def _sgd_step(state, batch, hparams):
  """A tiny pure step: least squares on a batch, one SGD update."""
  w = state["w"]

  def loss_fn(w):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

  loss, grad = jax.value_and_grad(loss_fn)(w)
  return {"w": w - hparams["lr"] * grad, "step": state["step"] + 1}, {"loss": loss}


def test_the_epoch_loop_trains_exactly_n_steps_and_one_program_serves_every_length():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 4, 3)), jnp.float32)  # 6 batches of 4.
  y = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  hparams = {"lr": jnp.float32(0.1)}
  state = {"w": jnp.zeros(3), "step": jnp.int32(0)}

  @jax.jit
  def epoch(state, n_steps):
    return train.epoch_loop(_sgd_step, state, hparams, lambda i: {"x": x[i], "y": y[i]}, n_steps, 6)

  for n_steps in (6, 4, 1):
    looped, metrics = epoch(state, jnp.int32(n_steps))
    expected, losses = state, []
    for i in range(n_steps):
      expected, m = jax.jit(_sgd_step)(expected, {"x": x[i], "y": y[i]}, hparams)
      losses.append(m["loss"])
    np.testing.assert_allclose(looped["w"], expected["w"], rtol=1e-6)
    assert int(looped["step"]) == n_steps
    np.testing.assert_allclose(metrics["loss"][:n_steps], losses, rtol=1e-6)
    # A masked step computes on the unchanged state and its update is dropped.
    for i in range(n_steps, 6):
      _, dropped = jax.jit(_sgd_step)(looped, {"x": x[i], "y": y[i]}, hparams)
      np.testing.assert_allclose(metrics["loss"][i], dropped["loss"], rtol=1e-6)
  assert epoch._cache_size() == 1  # Folds whose epochs differ in length share the program.


@pytest.mark.slow  # The default run compares them within 1e-6: test_config.py, data.on_device.
def test_a_run_on_the_device_gives_the_bits_of_a_streamed_run(tmp_path):
  """data.on_device only moves where batches are made: predictions.csv and every epoch's
  loss come out the same, bit for bit, as XLA compiles for users (the other tests' -O0
  backend rounds the looped and the separate step differently)."""
  outputs = {}
  for setting in ("always", "never"):
    workdir = tmp_path / setting
    process = run_module(
      "ser_jax.main",
      tiny_args(
        workdir,
        tmp_path / "cache",
        **{"data.on_device": setting, "cv.folds": "(0,)", "train.num_epochs": 2},
      ),
      env={"XLA_FLAGS": USER_OPTIMIZATION},
    )
    assert process.returncode == 0, process.stderr
    assert ("Features on the device" in process.stderr) == (setting == "always")
    provenance = json.loads((workdir / "results.json").read_text())["provenance"]
    assert provenance["features_on_device"] == (setting == "always")
    losses = [json.loads(line)["train_loss"] for line in open(workdir / "metrics.jsonl")]
    outputs[setting] = ((workdir / "predictions.csv").read_text(), losses)
  assert outputs["always"][1] == outputs["never"][1]
  assert outputs["always"][0] == outputs["never"][0]
