"""Tensors of a model over several devices (models.placement): each layer's activations live where the
layer ran, so code that combines layers, or indexes an activation with ids made beside the embedding,
brings them together first."""

from __future__ import annotations

import torch


def one_device(parts: list[torch.Tensor], device=None) -> list[torch.Tensor]:
    """The parts on `device` (default: where the last of them lives, beside the unembedding), ready to be
    stacked; the list itself when they already share one."""
    if not parts:
        return parts
    device = parts[-1].device if device is None else torch.device(device)
    return parts if all(p.device == device for p in parts) else [p.to(device) for p in parts]


def take(tensor: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """tensor[index...] with the index tensors moved to the tensor's device first."""
    return tensor[tuple(i.to(tensor.device) if torch.is_tensor(i) else i for i in index)]
