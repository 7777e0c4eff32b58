"""Asymmetric JAM-Cross (issue 17) on the metaseq host at --model-parallel-size 2: two gloo
processes with metaseq's megatron layers build rank r's part of a JAM-Cross whose image branch is
narrower, deeper and has other heads than the LLM's; each rank holds exactly jam-ckpt's
``-model_part-r`` keys and shapes, its tensors are the size-1 model's split by the key schema's
rules (the untied, vocab-parallel output head included), loss and gradients equal size 1's, and
loaded from ``jam-ckpt cross --mp 2`` parts the loss equals the size-1 model loaded from --mp 1.
Runs in the metaseq environment (``-m metaseq``), like ``test_hosts_metaseq.py``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from test_hosts_metaseq import _free_port, _real_metaseq, metaseq_args

pytestmark = pytest.mark.metaseq

IMG_FLAGS = ("--img-embed-dim", "16", "--img-ffn-embed-dim", "48", "--img-layers", "3",
             "--img-attention-heads", "2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from _hosts_util import make_data

    return make_data(tmp_path_factory.mktemp("msdata_asym"), n_train=8, n_valid=4)


def _result(data: Path, *, mp: int, start: str) -> dict:
    from metaseq import tasks

    args = metaseq_args(data, "jam_cross", mp=mp, extra=IMG_FLAGS)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    assert not model.jam_config.symmetric
    criterion = task.build_criterion(args)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(4)])
    model.train()
    loss, _, _ = criterion(model, sample)
    loss.backward()
    out = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "loss": loss.item(),
           "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    if mp > 1:
        from metaseq.modules.megatron import mpu

        start = start.replace(".pt", f"-model_part-{mpu.get_tensor_model_parallel_rank()}.pt")
    model.load_state_dict(torch.load(start, weights_only=False)["model"], strict=True)
    out["loaded_loss"] = criterion(model, sample)[0].item()
    return out


def _worker(rank: int, world: int, port: int, data: str, start: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    from metaseq.modules.megatron import mpu

    mpu.initialize_model_parallel(world)
    mpu.model_parallel_cuda_manual_seed(1)
    torch.manual_seed(1000 + rank)  # the model's weights must not depend on the process's RNG
    torch.save(_result(Path(data), mp=world, start=start), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_asymmetric_cross_at_model_parallel_2_is_the_jam_ckpt_parts(data, tmp_path):
    _real_metaseq()
    import torch.multiprocessing as mp

    from _hosts_util import VOCAB
    from checkpoints_tools import layout
    from checkpoints_tools.cli import main as jam_ckpt
    from jam_metaseq.models import build_model
    from jam_metaseq.models.config import preset

    parents = {}
    for name, seed, shape in (("llm", 11, {}), ("img", 22, dict(embed_dim=16, ffn_dim=48, layers=3, heads=2))):
        cfg = preset("tiny", vocab_size=VOCAB.size, **shape)
        torch.manual_seed(seed)
        parents[name] = tmp_path / f"{name}.pt"
        torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict(),
                    "cfg": {"model": argparse.Namespace(_name="transformer_lm", arch="transformer_lm")}},
                   parents[name])
    VOCAB.save(tmp_path / "vocab.json")
    for m in (1, 2):
        assert jam_ckpt(["cross", "--llm", str(parents["llm"]), "--img", str(parents["img"]), "--cross-every", "1",
                         "--vocab", str(tmp_path / "vocab.json"), "-o", str(tmp_path / f"mp{m}"), "--mp", str(m),
                         "--quiet"]) == 0
    ref = _result(data, mp=1, start=str(tmp_path / "mp1" / "checkpoint.pt"))
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path / "mp2" / "checkpoint.pt"), str(tmp_path)),
             nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        part = torch.load(tmp_path / "mp2" / f"checkpoint-model_part-{r}.pt", weights_only=False)["model"]
        assert {k: tuple(v.shape) for k, v in got["state"].items()} == {k: tuple(v.shape) for k, v in part.items()}
        assert "decoder.embed_tokens_cm3.weight" in part and part["decoder.output_projection.weight"].shape[0] == 56
        for k, v in got["state"].items():
            assert torch.equal(v, layout.split(k, ref["state"][k], 2)[r]), f"rank {r}: {k} is not its plan piece"
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for k, g in got["grads"].items():
            torch.testing.assert_close(g, layout.split(k, ref["grads"][k], 2)[r], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {r} grad {k}: {m}")
        assert got["loaded_loss"] == pytest.approx(ref["loaded_loss"], rel=1e-5)
