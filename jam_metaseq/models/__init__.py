"""Model family: the metaseq decoder (parents, JAM-Uniform, JAM-Width) and JAM-Cross (paper §2.1)."""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache
from .config import (
    PRESETS, CrossConfig, DecoderConfig, ModelConfig, config_from_dict, config_from_json,
    config_to_json, cross_of, preset, uniform_of, width_of,
)
from .cross import JamCrossLM
from .decoder import DecoderLM

__all__ = [
    "PRESETS", "CrossConfig", "DecoderConfig", "DecoderLM", "JamCrossLM", "KVCache", "ModelConfig",
    "build_model", "config_from_dict", "config_from_json", "config_to_json", "count_parameters",
    "cross_of", "preset", "uniform_of", "width_of",
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
