"""The paper's protocol in plain PyTorch: ResNet-18, focal loss, stratified 5 folds.

The reference that ser_jax's whole run is timed against (benchmarks/side_by_side.py). It
reads the config file ser_jax reads (configs/mfcc_focal.py by default, `--set key=value`
as `--config.key=value`), and takes from ser_jax only what makes both see the same data:
the feature store (built if missing), the folds, each fold's normalisation and each
epoch's batch order (ser_jax.run_data, ser_jax.input_pipeline), and the metrics'
definitions. Training is PyTorch alone: benchmarks/torch_resnet.py's ResNet-18
(channels-last, Flax's initialisers), focal loss, AdamW (weight decay decoupled, scaled by
the rate, as optax.adamw) with linear warm-up then cosine decay per step, ser_jax's time
shift and SpecAugment masks drawn on the device, a checkpoint every
train.checkpoint_every_epochs (and the last, the newest two kept), evaluation at the end
of each fold.

--mode eager (float32), bf16 (eager under bfloat16 autocast), compile (torch.compile of
the training model; one line and eager where compiling fails; evaluation runs eager).
With train.deterministic in the config (ser_jax's key, where present) set, PyTorch runs
its deterministic algorithms; otherwise cudnn.benchmark.

Writes <workdir>/metrics.jsonl (ser_jax's fields: fold, epoch, step, train_loss,
train_accuracy, learning_rate, seconds), results.json (ser_jax.run_results' layout, the
framework, mode and device as its provenance) and fold_<k>/checkpoint_<epoch>.pt;
prints the wall, steady training samples/s (every fold's epochs but its first) and WA/UA
per fold.

  python benchmarks/torch_protocol.py --workdir /tmp/tp --set data.corpus=demo \\
    --set model.width=8 --set train.num_epochs=2                        # a quick check
  python benchmarks/torch_protocol.py --workdir /tmp/tp --mode compile \\
    --set data.corpus=emodb --set data.root=../shared/data/emodb --set features.max_seconds=2.0
"""

from __future__ import annotations

import os

# ser_jax is imported for its data only: its JAX must not take the GPU from PyTorch.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# cuBLAS's deterministic workspace; read when CUDA starts, harmless otherwise.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_resnet  # noqa: E402

from ser_jax import input_pipeline, metrics, run_data, run_results  # noqa: E402
from ser_jax.config import validate_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
MODES = ("eager", "bf16", "compile")


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
  """ser_jax.train.scheduled_learning_rate / learning_rate at optimiser step `step` (from 0)."""
  if step < max(warmup_steps, 1):
    return step / max(warmup_steps, 1)
  progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
  return 0.5 * (1.0 + math.cos(math.pi * progress))


def class_weights(alpha, train_labels: np.ndarray, n_classes: int) -> torch.Tensor | None:
  """loss.alpha: none, given per class, or 1 / count in the training fold (mean 1)."""
  if alpha == "inverse_frequency":
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return torch.tensor(weights * n_classes / weights.sum(), dtype=torch.float32)
  return torch.tensor(alpha, dtype=torch.float32) if tuple(alpha) else None


class Protocol:
  """One model, optimiser and (maybe compiled) forward, re-initialised for every fold."""

  def __init__(self, config, mode: str, device: torch.device, n_classes: int):
    self.config, self.mode, self.device = config, mode, device
    self.model = torch_resnet.ResNet18(n_classes, config.model.width)
    self.model = self.model.to(device, memory_format=torch.channels_last)
    self.forward = torch.compile(self.model) if mode == "compile" else self.model
    self.mode_taken = mode

  def autocast(self):
    if self.mode != "bf16":
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=torch.bfloat16)

  def inputs(self, features: torch.Tensor) -> torch.Tensor:
    return features.unsqueeze(1).contiguous(memory_format=torch.channels_last)

  def logits(self, x: torch.Tensor) -> torch.Tensor:
    """Training forward; a torch.compile that fails (on its first call) falls back to eager."""
    try:
      return self.forward(x)
    except Exception as error:
      if self.forward is self.model:
        raise
      print(f"torch.compile failed, running eager: {type(error).__name__}: {error}".split("\n")[0])
      self.forward, self.mode_taken = self.model, "eager (compile failed)"
      return self.model(x)

  def train_fold(self, store, fold: int, train_idx, mean, std, workdir: pathlib.Path, log) -> None:
    config, device = self.config, self.device
    train_cfg = config.train
    seed = config.seed * 1000 + fold  # ser_jax's per-fold seed (stacked_hparams' rng_seed).
    torch.manual_seed(seed)
    fresh = torch_resnet.init_like_flax(torch_resnet.ResNet18(*self._shape()))
    self.model.load_state_dict(fresh.state_dict())
    optimizer = torch.optim.AdamW(
      self.model.parameters(),
      lr=train_cfg.learning_rate,
      betas=(0.9, 0.999),
      eps=1e-8,
      weight_decay=train_cfg.weight_decay,
    )
    steps_per_epoch = len(train_idx) // train_cfg.batch_size
    warmup, total = (
      steps_per_epoch * train_cfg.warmup_epochs,
      steps_per_epoch * train_cfg.num_epochs,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: lr_factor(step, warmup, total)
    )
    n_classes = self.model.head.out_features
    alpha = class_weights(config.loss.alpha, store.labels[train_idx], n_classes)
    alpha = None if alpha is None else alpha.to(device)
    gamma = config.loss.gamma if config.loss.name == "focal" else 0.0
    fold_dir = workdir / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(train_cfg.num_epochs):
      start = time.perf_counter()
      self.model.train()
      loss_sum = torch.zeros((), device=device)
      correct = torch.zeros((), device=device)
      steps = 0
      for batch in input_pipeline.train_batches(
        store, train_idx, train_cfg.batch_size, mean, std, seed=config.seed, fold=fold, epoch=epoch
      ):
        features = torch.from_numpy(batch["features"]).to(device, non_blocking=True)
        labels = torch.from_numpy(batch["labels"]).to(device, non_blocking=True).long()
        valid = torch.from_numpy(batch["valid_frames"]).to(device, non_blocking=True)
        x = torch_resnet.augment(
          features,
          valid,
          train_cfg.freq_masks,
          train_cfg.freq_mask_bins,
          train_cfg.time_masks,
          train_cfg.time_mask_frames,
          train_cfg.time_shift,
        )
        with self.autocast():
          logits = self.logits(self.inputs(x))
        per_example = torch_resnet.focal_loss(
          logits, labels, gamma, alpha, train_cfg.label_smoothing
        )
        loss = per_example.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(-1) == labels).float().mean()
        steps += 1
      # The one wait of the epoch, as ser_jax's host reads its metrics once per epoch.
      train_loss, accuracy = (loss_sum / steps).item(), (100 * correct / steps).item()
      if not math.isfinite(train_loss):
        raise SystemExit(f"error: non-finite training loss in fold {fold}, epoch {epoch + 1}")
      log(
        {
          "fold": fold,
          "first_member": 0,
          "epoch": epoch + 1,
          "step": (epoch + 1) * steps,
          "train_loss": [train_loss],
          "train_accuracy": [accuracy],
          "learning_rate": [
            train_cfg.learning_rate * lr_factor((epoch + 1) * steps - 1, warmup, total)
          ],
          "seconds": time.perf_counter() - start,
        }
      )
      last = epoch + 1 == train_cfg.num_epochs
      if (epoch + 1) % train_cfg.checkpoint_every_epochs == 0 or last:
        self._checkpoint(fold_dir, epoch + 1, optimizer, schedule)

  def _shape(self) -> tuple[int, int]:
    return self.model.head.out_features, self.config.model.width

  def _checkpoint(self, fold_dir: pathlib.Path, epoch: int, optimizer, schedule) -> None:
    """fold_<k>/checkpoint_<epoch>.pt, written whole then renamed; the newest two kept."""
    state = {
      "epoch": epoch,
      "model": self.model.state_dict(),
      "optimizer": optimizer.state_dict(),
      "schedule": schedule.state_dict(),
    }
    path = fold_dir / f"checkpoint_{epoch}.pt"
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    saved = sorted(fold_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for old in saved[:-2]:
      old.unlink()

  @torch.inference_mode()
  def evaluate(self, store, test_idx, mean, std) -> np.ndarray:
    """Predicted classes of the fold's test utterances, batched as ser_jax batches them."""
    self.model.eval()
    predictions = []
    for batch, n_real in input_pipeline.eval_batches(
      store, test_idx, self.config.train.eval_batch_size, mean, std
    ):
      x = torch.from_numpy(batch["features"]).to(self.device)
      with self.autocast():
        logits = self.model(self.inputs(x))
      predictions.append(logits.float().argmax(-1)[:n_real].cpu().numpy())
    return np.concatenate(predictions)


def main() -> None:
  start = time.perf_counter()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(REPO / "configs" / "mfcc_focal.py"))
  parser.add_argument("--workdir", required=True, help="metrics, checkpoints and results")
  parser.add_argument("--set", action="append", default=[], help="config override key=value")
  parser.add_argument("--mode", default="eager", choices=MODES)
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  args = parser.parse_args()
  config = common.load_config(args.config, args.set)
  validate_config(config)
  device = torch.device(args.device)
  deterministic = bool(config.train.get("deterministic", False))
  torch.backends.cudnn.benchmark = not deterministic
  torch.backends.cudnn.deterministic = deterministic
  torch.use_deterministic_algorithms(deterministic, warn_only=True)
  name = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model()
  print(
    f"torch {torch.__version__} on {device} ({name}), threads {torch.get_num_threads()}, "
    f"mode {args.mode}, deterministic {deterministic}"
  )

  store = run_data.prepare_store(config)
  kept = run_data.utterances(config, store)
  folds = run_data.cross_validation_folds(config, store, kept)
  n_classes = len(store.class_names)
  print(f"store {store.path}: {len(kept)} utterances, features {store.features.shape[1:]}")
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  records = []
  metrics_path = workdir / "metrics.jsonl"
  metrics_path.write_text("")

  def log(record: dict) -> None:
    records.append(record)
    with open(metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")

  protocol = Protocol(config, args.mode, device, n_classes)
  folds_tested = []
  for k in list(config.cv.folds) or range(len(folds)):
    train_idx, test_idx = folds[k]
    fold_start = time.perf_counter()
    mean, std = input_pipeline.normalisation_stats(store.features, train_idx, store.valid_frames)
    protocol.train_fold(store, k, train_idx, mean, std, workdir, log)
    predicted = protocol.evaluate(store, test_idx, mean, std)
    counts = metrics.confusion_counts(store.labels[test_idx], predicted, n_classes)
    folds_tested.append(run_results.FoldResults(k, len(train_idx), len(test_idx), counts))
    print(
      f"fold {k}: WA {metrics.wa(counts):.2f}  UA {metrics.ua(counts):.2f}  "
      f"(train {len(train_idx)}, test {len(test_idx)}) {time.perf_counter() - fold_start:.1f} s"
    )
  wall = time.perf_counter() - start
  rate = common.steady_samples_per_second(records, config.train.batch_size)
  loss = config.loss
  model = run_results.MemberResults(
    gamma=float(loss.gamma) if loss.name == "focal" else 0.0,
    seed=int(config.seed),
    learning_rate=float(config.train.learning_rate),
    alpha=loss.alpha,
    folds=folds_tested,
  )
  run_results.write(
    workdir,
    run_results.RunResults(
      class_names=store.class_names,
      members=[model],
      config=json.loads(config.to_json_best_effort()),
      feature_store=str(store.path),
      provenance={
        "framework": f"torch {torch.__version__}",
        "mode": args.mode,
        "lowering": protocol.mode_taken,
        "device": name,
        "deterministic": deterministic,
      },
      wall_seconds=wall,
    ),
  )
  print(
    f"torch {protocol.mode_taken}: WA {model.wa_fold_mean:.2f} +/- "
    f"{model.wa_fold_std:.2f}, UA {model.ua_fold_mean:.2f} +/- "
    f"{model.ua_fold_std:.2f}; wall {wall:.1f} s (after imports), "
    f"steady {rate:.1f} samples/s"
  )


if __name__ == "__main__":
  sys.stdout.reconfigure(line_buffering=True)
  main()
