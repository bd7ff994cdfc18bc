"""The same ResNet-18, loss, augmentation and AdamW step in PyTorch (benchmark reference only).

Mirrors ser_jax.models.ResNet (7x7/2 stem, 3x3/2 max-pool, BasicBlocks with 1x1
projections, no conv bias, BatchNorm eps 1e-5, zero-initialised last BN scale per
block, 4 classes, one input channel), losses.focal_loss and train.augment, channels-last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_PARAMS = 11_172_292  # ser_jax's ResNet-18 with 1 input channel and 4 classes.


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
    nn.init.zeros_(self.bn2.weight)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet18(nn.Module):
  def __init__(self, num_classes: int = 4, width: int = 64):
    super().__init__()
    self.stem = nn.Conv2d(1, width, 7, 2, 3, bias=False)
    self.stem_bn = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    blocks, cin = [], width
    for stage in range(4):
      cout = width * 2**stage
      for block in range(2):
        blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    x = self.blocks(x)
    return self.head(x.mean(dim=(2, 3)))


def focal_loss(logits, labels, gamma: float, alpha=None, label_smoothing: float = 0.0):
  """ser_jax.losses.focal_loss, per example."""
  n_classes = logits.shape[-1]
  log_probs = F.log_softmax(logits.float(), dim=-1)
  one_hot = F.one_hot(labels, n_classes).to(log_probs.dtype)
  log_p_rest = torch.logsumexp(log_probs.masked_fill(one_hot > 0, float("-inf")), dim=-1)
  modulating = torch.exp(gamma * log_p_rest)
  target = one_hot * (1.0 - label_smoothing) + label_smoothing / n_classes
  loss = modulating * -(target * log_probs).sum(-1)
  if alpha is not None:
    loss = loss * (one_hot * alpha).sum(-1)
  return loss


def augment(
  x, valid, freq_masks=2, freq_bins=4, time_masks=2, time_frames=20, time_shift: bool = True
):
  """ser_jax.train.augment on x's device: circular shift within the valid frames, then masks.

  x: [batch, n_bins, n_frames] standardised features; valid: [batch] valid frames.
  """
  batch, n_bins, n_frames = x.shape
  device = x.device
  valid = valid.to(device)
  if time_shift:
    frames = torch.arange(n_frames, device=device)
    offsets = torch.randint(0, n_frames, (batch,), device=device) % valid.clamp(min=1)
    inside = frames[None, :] < valid[:, None]
    shifted = (frames[None, :] + offsets[:, None]) % valid.clamp(min=1)[:, None]
    source = torch.where(inside, shifted, frames)
    x = torch.gather(x, 2, source[:, None, :].expand(batch, n_bins, n_frames))

  def masks(count, width, size):
    widths = torch.randint(0, width + 1, (batch, count), device=device)
    starts = torch.randint(0, size, (batch, count), device=device)
    pos = torch.arange(size, device=device)[None, None, :]
    return ((pos >= starts[..., None]) & (pos < (starts + widths)[..., None])).any(1)

  drop = torch.zeros((batch, n_bins, n_frames), dtype=torch.bool, device=device)
  if freq_masks:
    drop |= masks(freq_masks, freq_bins, n_bins)[:, :, None]
  if time_masks:
    drop |= masks(time_masks, time_frames, n_frames)[:, None, :]
  return x.masked_fill(drop, 0.0)


def init_like_flax(model: nn.Module) -> nn.Module:
  """Flax's initialisers in place of PyTorch's: kernels lecun-normal (truncated at two
  standard deviations, variance 1 / fan-in), the head's bias zero; BatchNorm as built."""
  for module in model.modules():
    if isinstance(module, nn.Conv2d | nn.Linear):
      fan_in = module.weight[0].numel()
      std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978  # Flax's truncation correction.
      nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
      if module.bias is not None:
        nn.init.zeros_(module.bias)
  return model


class TorchTrainer:
  """Model, AdamW and eager train / eval steps on numpy batches."""

  def __init__(self, lr: float = 1e-3, weight_decay: float = 1e-2, gamma: float = 2.0):
    torch.manual_seed(0)
    self.model = ResNet18().to(memory_format=torch.channels_last)
    n = sum(p.numel() for p in self.model.parameters())
    assert n == N_PARAMS, f"PyTorch ResNet-18 has {n} parameters, expected {N_PARAMS}"
    self.opt = torch.optim.AdamW(
      self.model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay
    )
    self.gamma = gamma
    self.compiled_eval = None

  @staticmethod
  def _inputs(features):
    return features.unsqueeze(1).contiguous(memory_format=torch.channels_last)

  def train_step(self, batch) -> float:
    self.model.train()
    x = augment(torch.from_numpy(batch["features"]), torch.from_numpy(batch["valid_frames"]))
    labels = torch.from_numpy(batch["labels"]).long()
    logits = self.model(self._inputs(x))
    loss = focal_loss(logits, labels, self.gamma).mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return float(loss.detach())

  def eval_step(self, batch, compiled: bool = False):
    self.model.eval()
    fn = self.compiled_eval if compiled else self.model
    with torch.inference_mode():
      return torch.softmax(fn(self._inputs(torch.from_numpy(batch["features"]))), -1)

  def compile_eval(self):
    self.compiled_eval = torch.compile(self.model)
