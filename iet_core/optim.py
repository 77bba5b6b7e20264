"""Flat parameters and a gated Adam(W) for the proxies.

A model's parameters (and gradients) are viewed into one contiguous vector, so that a proxy's
weights, EMA, optimizer moments, averaging and checkpoints are single tensors. The optimizer
step is gated by a device tensor: a batch whose samples were all skipped leaves weights,
moments and step count untouched, with no host sync to find that out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


class FlatParams:
    """Re-homes a module's parameters as views into one vector (call after moving the module
    to its device: `.to()` would break the views). With channels_last, 4-d (conv) weights are
    stored output, height, width, input in the vector, so their views have channels-last strides."""

    def __init__(self, module: torch.nn.Module, channels_last: bool = False):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.channels_last = channels_last
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = self.offsets[-1]
        self.data = self.flatten(dict(zip(self.names, (p.detach() for p in self.params))))
        self.grad = torch.zeros_like(self.data)
        self.bind(self.data, self.grad)

    def _view(self, segment: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(..., numel) -> (..., *shape), channels-last for 4-d weights when asked."""
        if self.channels_last and len(shape) == 4:
            out_channels, in_channels, height, width = shape
            return segment.unflatten(-1, (out_channels, height, width, in_channels)).movedim(-1, -3)
        return segment.unflatten(-1, shape)

    def flatten(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The vector of these parameters from a state dict, or (J, numel) from stacked
        {name: (J, *shape)} (the inverse of the views)."""
        lead = state[self.names[0]].dim() - len(self.shapes[0])
        parts = [state[name].movedim(-3, -1) if self.channels_last and len(shape) == 4 else state[name]
                 for name, shape in zip(self.names, self.shapes)]
        return torch.cat([part.flatten(lead) for part in parts], dim=-1)

    def bind(self, data: torch.Tensor, grad: torch.Tensor) -> None:
        """Point the module's parameters and gradients at these vectors (e.g. one proxy's row)."""
        self.data, self.grad = data, grad
        for p, shape, start, end in zip(self.params, self.shapes, self.offsets, self.offsets[1:]):
            p.data = self._view(data[start:end], shape)
            p.grad = self._view(grad[start:end], shape)

    def unflatten(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of stacked vectors (J, numel) as {name: (J, *shape)}, for torch.func.functional_call."""
        return {name: self._view(stacked[:, start:end], shape)
                for name, shape, start, end in zip(self.names, self.shapes, self.offsets, self.offsets[1:])}

    def zero_grad(self) -> None:
        self.grad.zero_()


@dataclass
class AdamState:
    """Adam moments for one or several stacked parameter vectors (..., numel); `step` (..., 1)
    counts real (ungated) steps for bias correction."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor

    @classmethod
    def zeros_like(cls, flat: torch.Tensor) -> "AdamState":
        return cls(torch.zeros_like(flat), torch.zeros_like(flat), flat.new_zeros(*flat.shape[:-1], 1))

    def rows(self, rows: slice) -> "AdamState":
        return AdamState(self.exp_avg[rows], self.exp_avg_sq[rows], self.step[rows])

    def zero_(self) -> None:
        for tensor in (self.exp_avg, self.exp_avg_sq, self.step):
            tensor.zero_()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.exp_avg": self.exp_avg, f"{prefix}.exp_avg_sq": self.exp_avg_sq, f"{prefix}.step": self.step}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, device) -> "AdamState":
        return cls(*(tensors[f"{prefix}.{k}"].to(device) for k in ("exp_avg", "exp_avg_sq", "step")))


def clip_grad_norm_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ on flat gradients, each row (last dim) on its own;
    returns the pre-clip norms (..., 1)."""
    norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
    grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


@torch.no_grad()
def adam_step(param: torch.Tensor, grad: torch.Tensor, state: AdamState, lr: float, do_step: torch.Tensor | None,
              betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
    """torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) on flat tensors, in place;
    stacked rows (J, numel) are J independent optimizers. `do_step` ((J, 1) or 0-dim bool
    tensor, or None for always) gates each row's whole update."""
    beta1, beta2 = betas
    step = state.step + 1 if do_step is None else state.step + do_step.to(state.step.dtype)
    if weight_decay and not decoupled:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg = state.exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = state.exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1 ** step.clamp(min=1)
    bias2_sqrt = (1 - beta2 ** step.clamp(min=1)).sqrt()
    update = (exp_avg / bias1) / (exp_avg_sq.sqrt() / bias2_sqrt + eps)
    new_param = param * (1 - lr * weight_decay) if (weight_decay and decoupled) else param
    new_param = new_param - lr * update
    if do_step is None:
        param.copy_(new_param)
        state.exp_avg.copy_(exp_avg)
        state.exp_avg_sq.copy_(exp_avg_sq)
    else:
        param.copy_(torch.where(do_step, new_param, param))
        state.exp_avg.copy_(torch.where(do_step, exp_avg, state.exp_avg))
        state.exp_avg_sq.copy_(torch.where(do_step, exp_avg_sq, state.exp_avg_sq))
    state.step.copy_(step)


def ema_update_(ema: torch.Tensor, param: torch.Tensor, decay: float, do_step: torch.Tensor | None) -> None:
    weight = 1.0 - decay if do_step is None else (1.0 - decay) * do_step.to(ema.dtype)
    ema.lerp_(param, weight)


def shard_weights(sizes: list[int]) -> list[float]:
    """FedAvg weights |D_k| / |D|."""
    total = sum(sizes)
    return [n / total for n in sizes]


def weighted_average(vectors, sizes: list[int], rows: Iterable[int] | None = None) -> torch.Tensor:
    """sum_k (|D_k| / |D|) * v_k over the proxies k (a list or the rows of a (K, P) tensor),
    accumulated in proxy order. With `rows`, only those proxies' share: the part one process
    adds before the all-reduce that completes the average."""
    weights = shard_weights(sizes)
    total = torch.zeros_like(vectors[0])
    for k in range(len(sizes)) if rows is None else rows:
        total.add_(vectors[k], alpha=weights[k])
    return total
