"""Fixtures for the checkpoints_tools tests: tiny random parents written the way metaseq and
fairscale write them, by code independent of ``checkpoints_tools`` (a reference to test against).

- ``ref_mp_split``: Megatron/metaseq model-parallel split with explicit index arithmetic
  (qkv: rank r holds rows [K_r; V_r; Q_r]).
- ``save_metaseq``: ``torch.save`` of consolidated / ``-model_part-{r}`` / ``-shard{j}`` files with
  a ``cfg`` whose ``model`` is an ``argparse.Namespace``; FSDP shards follow fairscale's
  ``shard_metadata`` (one flat parameter per layer + a root, chunked with zero padding).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch

from jam_metaseq.models import build_model
from jam_metaseq.models.config import DecoderConfig, preset


def tiny_parent(seed: int, **overrides) -> tuple[DecoderConfig, "OrderedDict[str, torch.Tensor]"]:
    """A tiny decoder (E=32, 4 heads, vocab 128) with every parameter random."""
    cfg = preset("tiny", **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "layer_norm.weight" in name else 0.0))
    return cfg, OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


def _rule(name: str) -> str:
    if name.endswith(("embed_tokens.weight", "output_projection.weight")):
        return "rows"
    if ".qkv_proj." in name:
        return "qkv"
    if name.endswith(("fc1.weight", "fc1.bias", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                      "q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return "rows"
    if name.endswith(("out_proj.weight", "fc2.weight")):
        return "cols"
    return "replicated"


def ref_mp_split(name: str, t: torch.Tensor, n: int) -> list[torch.Tensor]:
    rule = _rule(name)
    if rule == "replicated":
        return [t.clone() for _ in range(n)]
    if rule == "cols":
        w = t.shape[1] // n
        return [t[:, r * w:(r + 1) * w].clone() for r in range(n)]
    if rule == "rows":
        h = t.shape[0] // n
        return [t[r * h:(r + 1) * h].clone() for r in range(n)]
    E = t.shape[0] // 3
    h = E // n
    return [torch.cat([t[r * h:(r + 1) * h], t[E + r * h:E + (r + 1) * h], t[2 * E + r * h:2 * E + (r + 1) * h]])
            for r in range(n)]


def _namespace(cfg: DecoderConfig) -> argparse.Namespace:
    return argparse.Namespace(arch="transformer_lm", decoder_embed_dim=cfg.embed_dim,
                              decoder_attention_heads=cfg.heads, decoder_layers=cfg.layers,
                              activation_fn=cfg.activation, no_scale_embedding=not cfg.scale_embedding)


def _fsdp_shards(state: "OrderedDict[str, torch.Tensor]", world: int, *, wrapper: bool):
    """fairscale-style flat shards: (per-rank model dicts, per-rank shard_metadata)."""
    units: "OrderedDict[str, list[tuple[str, torch.Tensor]]]" = OrderedDict()
    units[""] = []
    buffers = []
    for k, v in state.items():
        if k.endswith(".version"):
            buffers.append(k)
            continue
        if k == "decoder.output_projection.weight":
            continue  # shared with embed_tokens
        parts = k.split(".")
        if parts[1] == "layers":
            path, local = ".".join(parts[:3]), ".".join(parts[3:])
        else:
            path, local = "", k
        units.setdefault(path, []).append((("_fpw_module." + local) if wrapper else local, v))
    models = [OrderedDict() for _ in range(world)]
    metas = [{"param_metadata": [], "buffer_names": buffers} for _ in range(world)]
    for path, items in units.items():
        flat = torch.cat([v.reshape(-1) for _, v in items])
        per = -(-flat.numel() // world)
        key = (path + "." if path else "") + ("_fsdp_wrapped_module.flat_param_0" if wrapper and path else "flat_param_0")
        for j in range(world):
            chunk = flat[j * per:(j + 1) * per]
            pad = per - chunk.numel()
            models[j][key] = torch.cat([chunk, chunk.new_zeros(pad)])
            metas[j]["param_metadata"].append({
                "fsdp_path": path,
                "params": {"flat_param_0": {"names": [n for n, _ in items], "shapes": [v.shape for _, v in items],
                                            "numels": [v.numel() for _, v in items], "padding": pad}},
                "no_broadcast_optim_state": False,
                "shared_param_info": [("decoder.embed_tokens.weight", "decoder.output_projection.weight")] if not path else [],
            })
    for j in range(world):
        for b in buffers:
            models[j][b] = state[b].clone()
    return models, metas


def save_metaseq(out_dir: Path, cfg: DecoderConfig, state: "OrderedDict[str, torch.Tensor]", *, mp: int = 1,
                 fsdp: int = 0, base: str = "checkpoint_last", wrapper: bool = True) -> Path:
    """Write ``state`` in metaseq's layout; returns the ``--restore-file`` style path (base.pt)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [OrderedDict() for _ in range(mp)]
    for k, v in state.items():
        for r, piece in enumerate(ref_mp_split(k, v, mp)):
            parts[r][k] = piece
    for r in range(mp):
        suffix = f"-model_part-{r}" if mp > 1 else ""
        cfg_dict = {"model": _namespace(cfg), "common": {"model_parallel_size": mp}}
        if fsdp:
            models, metas = _fsdp_shards(parts[r], fsdp, wrapper=wrapper)
            for j in range(fsdp):
                torch.save({"model": models[j], "cfg": cfg_dict, "shard_metadata": metas[j],
                            "optimizer_history": [], "extra_state": {}}, out_dir / f"{base}{suffix}-shard{j}.pt")
        else:
            torch.save({"model": parts[r], "cfg": cfg_dict, "optimizer_history": [], "extra_state": {}},
                       out_dir / f"{base}{suffix}.pt")
    return out_dir / f"{base}.pt"


def assert_state_equal(a, b) -> None:
    assert list(a) == list(b) or set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert torch.equal(a[k], b[k]), k
