"""Model family: the metaseq decoder (parents, JAM-Uniform, JAM-Width) and JAM-Cross (paper §2.1)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .cache import KVCache
from .config import (
    PRESETS, CrossConfig, DecoderConfig, ModelConfig, config_from_dict, config_from_json,
    config_to_json, cross_of, preset, uniform_of, width_of,
)
from .cross import JamCrossLM
from . import keys
from .decoder import DecoderLM, fresh_buffer, init_tensor_

__all__ = [
    "PRESETS", "CrossConfig", "DecoderConfig", "DecoderLM", "JamCrossLM", "KVCache", "ModelConfig",
    "build_model", "config_from_dict", "config_from_json", "config_to_json", "count_parameters",
    "cross_of", "fresh_buffer", "fresh_parameters", "keys", "preset", "uniform_of", "width_of",
]


def build_model(cfg: ModelConfig) -> nn.Module:
    """DecoderConfig -> DecoderLM (parents, JAM-Uniform, JAM-Width); CrossConfig -> JamCrossLM."""
    if isinstance(cfg, CrossConfig):
        return JamCrossLM(cfg)
    if isinstance(cfg, DecoderConfig):
        return DecoderLM(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count (tied weights once), built on the meta device: no memory, any size."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def fresh_parameters(model: nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, value)`` of every parameter ``build_model(cfg)`` starts with, one full tensor at a
    time, for ``model`` = ``build_model(cfg)`` built on the meta device (which draws nothing).

    Consumes torch's global generator exactly as ``build_model(cfg)`` on the CPU does: first what
    the PyTorch layers draw when they are constructed (their ``reset_parameters``, module by
    module in construction order = ``model.modules()`` order, each on a full-size tensor that is
    dropped again), then ``init_tensor_`` per parameter in ``named_parameters()`` order. Seeded
    alike, the values are bitwise ``build_model(cfg)``'s; a caller that keeps a piece of each and
    drops the rest never holds more than one whole tensor. ``model`` stays on the meta device.
    Draw nothing else from the global generator until the iterator is exhausted."""
    for module in model.modules():
        own = dict(module._parameters)
        if not any(p is not None for p in own.values()) or not hasattr(module, "reset_parameters"):
            continue
        module.to_empty(device="cpu", recurse=False)
        module.reset_parameters()  # the draws its constructor made
        module._parameters.update(own)  # back on the meta device, ties kept
    for key, p in model.named_parameters():
        yield key, init_tensor_(key, torch.empty(p.shape, dtype=p.dtype), cfg)
