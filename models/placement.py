"""A model over several devices: which block lives where, and moving the stream between them.

A model is cut into units: "embed" (embeddings and everything before the first block),
one unit per block ("blocks.3", or "encoder.blocks.3" / "decoder.blocks.1"), and "head"
(the final norm and the unembedding). `resolve_device_map` turns what the user wrote
(`"auto"`, `"balanced"`, `"sequential"`, `{block: device}`, `[devices]`) into a device per
unit; `accelerate`'s planner does the sizing for the named strategies. The forward then
moves the residual stream at each block's door (Block.forward) and at the head, so hooks
see every activation on its own block's device.
"""

from __future__ import annotations

import re

import torch
from torch import nn

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_BLOCK = re.compile(r"^((?:encoder\.|decoder\.)?blocks\.\d+)(?:\.|$)")
_HEAD = ("ln_final.", "mlm_head.", "unembed.", "decoder.ln_final.")


class DeviceMapError(ValueError):
    """A device_map that cannot be honoured (a device this machine lacks, a block left out, ...)."""


def unit_of(param_name: str, model: nn.Module | None = None) -> str:
    """The unit a parameter belongs to: its block, "head" or "embed". An encoder's final norm goes with the
    encoder's last block (what it normalises is there, and the decoder's cross-attention reads it anyway)."""
    match = _BLOCK.match(param_name)
    if match:
        return match.group(1)
    if param_name.startswith("encoder.ln_final.") and model is not None:
        return f"encoder.blocks.{len(model.encoder.blocks) - 1}"
    return "head" if param_name.startswith(_HEAD) else "embed"


def units(model: nn.Module) -> list[str]:
    """The model's units in forward order: embed, the blocks (encoder's then decoder's), head."""
    stacks = [("encoder.", model.encoder), ("decoder.", model.decoder)] if hasattr(model, "encoder") \
        else [("", model)]
    blocks = [f"{prefix}blocks.{i}" for prefix, stack in stacks for i in range(len(stack.blocks))]
    return ["embed", *blocks, "head"]


def as_device(spec) -> torch.device:
    """A device from what a user (or accelerate) writes: 0, "cuda:1", "cpu", torch.device. Checked to exist."""
    if isinstance(spec, int):
        spec = f"cuda:{spec}"
    if spec == "disk":
        raise DeviceMapError("this device_map puts weights on disk; the toolkit keeps every weight in memory: "
                             "give max_memory more room (e.g. {'cpu': '64GiB'}) so the planner uses host memory")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise DeviceMapError(f"{spec!r} is not a device ({exc}); write 'cpu', 'cuda:0', 0, ...") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count)) or "none"
            raise DeviceMapError(f"the device_map names {device} but this machine has {count} CUDA device(s) "
                                 f"({have}); name devices that exist, or use device_map='auto'")
        device = torch.device("cuda", index)
    elif device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise DeviceMapError(f"the device_map names {device} but this machine has no {device.type} device")
    return device


def resolve_device_map(model: nn.Module, device_map, max_memory: dict | None = None,
                       dtype: torch.dtype | None = None) -> dict[str, torch.device]:
    """{unit: device} for every unit of `model` (whose parameters may be on the meta device).

    device_map: "auto" / "balanced" / "balanced_low_0" / "sequential" (accelerate's planner, within
    `max_memory`), a dict {block index or unit name: device} naming every block ("embed" defaults to
    the first block's device, "head" to the last's), or a list of devices over which the blocks are
    cut into contiguous, nearly equal runs.
    """
    names = units(model)
    blocks = names[1:-1]
    if max_memory is not None and not (isinstance(device_map, str) and device_map in STRATEGIES):
        raise DeviceMapError("max_memory sizes accelerate's planner; use it with device_map='auto' (or "
                             f"'balanced', 'sequential'), not with {type(device_map).__name__} {device_map!r}")
    if isinstance(device_map, str) and device_map in STRATEGIES:
        placed = _plan(model, device_map, max_memory, dtype)
    elif isinstance(device_map, (str, torch.device, int)):
        device = as_device(device_map)
        placed = {name: device for name in names}
    elif isinstance(device_map, dict):
        placed = _from_dict(device_map, names)
    elif isinstance(device_map, (list, tuple)):
        if not device_map:
            raise DeviceMapError("device_map is an empty list; give at least one device")
        devices = [as_device(d) for d in device_map]
        if len(devices) > len(blocks):
            raise DeviceMapError(f"{len(devices)} devices for {len(blocks)} blocks: each device needs a block; "
                                 "give fewer devices")
        placed = {}
        for i, name in enumerate(blocks):
            placed[name] = devices[i * len(devices) // len(blocks)]
        placed["embed"], placed["head"] = devices[0], devices[-1]
    else:
        raise DeviceMapError(f"device_map must be 'auto', 'balanced', 'sequential', a dict {{block: device}} or "
                             f"a list of devices; got {type(device_map).__name__}")
    if getattr(getattr(model, "unembed", None), "tied", False):
        # W_U is W_E itself: the head computes where the embedding lives.
        placed["head"] = placed["embed"]
    return {name: placed[name] for name in names}


def _from_dict(device_map: dict, names: list[str]) -> dict[str, torch.device]:
    aliases = {"unembed": "head", "ln_final": "head", "embed_tokens": "embed"}
    placed = {}
    for key, value in device_map.items():
        name = f"blocks.{key}" if isinstance(key, int) else aliases.get(key, key)
        if name not in names:
            raise DeviceMapError(f"device_map key {key!r} is not a unit of this model; its units are "
                                 f"{names[0]}, {names[1]} ... {names[-2]}, {names[-1]} (or a block index)")
        placed[name] = as_device(value)
    missing = [n for n in names[1:-1] if n not in placed]
    if missing:
        raise DeviceMapError(f"device_map leaves out {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}: "
                             "name a device for every block (or pass a list of devices, or 'auto')")
    placed.setdefault("embed", placed[names[1]])
    placed.setdefault("head", placed[names[-2]])
    return placed


def _plan(model: nn.Module, strategy: str, max_memory: dict | None, dtype) -> dict[str, torch.device]:
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if max_memory is not None:
        max_memory = {k: v for k, v in max_memory.items()}
        for key in max_memory:
            as_device(key)  # a GPU this machine lacks is named now, not deep inside accelerate
    no_split = ["Block"]
    if strategy in ("auto", "balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         dtype=dtype, low_zero=strategy == "balanced_low_0")
    planned = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    placed = {}
    for name in units(model):
        probe = {"embed": "embed", "head": "unembed"}.get(name, name)
        owner = max((k for k in planned if k == "" or probe == k or probe.startswith(k + ".")), key=len, default=None)
        if owner is None:  # a unit without parameters of its own (a tied head): beside the embedding
            owner = max((k for k in planned if "embed".startswith(k)), key=len, default=next(iter(planned)))
        placed[name] = as_device(planned[owner])
    return placed


def place(model: nn.Module, placement: dict[str, torch.device]) -> None:
    """Move every parameter to its unit's device and tell the blocks where they live."""
    for name, param in list(model.named_parameters()):
        device = placement[unit_of(name, model)]
        if param.device != device:
            module, leaf = _owner(model, name)
            module._parameters[leaf] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
    refresh(model)


def refresh(model: nn.Module) -> None:
    """Mark each block with its device when the model spans several, else clear the marks (so a model on one
    device pays nothing at the blocks' doors)."""
    by_unit: dict[str, torch.device] = {}
    for name, param in model.named_parameters():
        by_unit.setdefault(unit_of(name, model), param.device)
    split = len(set(by_unit.values())) > 1
    for name in units(model):
        if name in ("embed", "head"):
            continue
        block = model.get_submodule(name)
        block.placed_on = by_unit.get(name) if split else None
    model.device_map = {name: str(by_unit[name]) for name in units(model) if name in by_unit} if split else None


def device_of(module: nn.Module | None) -> torch.device | None:
    if module is None:
        return None
    for param in module.parameters():
        return param.device
    return None


def follow(tensor: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """`tensor` on the device of `module`'s weights (itself when already there, or the module has none)."""
    device = device_of(module)
    return tensor if device is None or tensor.device == device else tensor.to(device)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf
