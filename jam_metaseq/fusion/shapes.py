"""The state-dict keys and shapes of a model config (built on the meta device, no memory): what
every fusion rule fills, tensor by tensor."""

from __future__ import annotations

import functools

import torch

from ..models import build_model
from ..models.config import CrossConfig, DecoderConfig, ModelConfig, config_from_json, config_to_json


@functools.lru_cache(maxsize=32)
def _shapes(cfg_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = build_model(config_from_json(cfg_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items())


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Ordered {state-dict key: shape} of the model ``cfg`` describes (built on the meta device)."""
    return dict(_shapes(config_to_json(cfg)))


def decoder_state_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    return state_shapes(cfg)


def cross_state_shapes(cfg: CrossConfig) -> dict[str, tuple[int, ...]]:
    return state_shapes(cfg)
