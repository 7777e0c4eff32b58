"""Fully-sharded (FSDP) training through fairseq, and the start checks every fully-sharded run
gets (docs/METASEQ.md, "What runs where"; the metaseq twins are ``test_hosts_metaseq_fsdp.py``).

fairseq's ``--ddp-backend fully_sharded`` is fairscale's FullyShardedDataParallel, which needs
CUDA streams: the two-rank runs here load test-only CPU stand-ins (``tests/cpu_fsdp/sitecustomize.py``,
on the subprocesses' ``PYTHONPATH`` only; the installed fairscale is untouched) and run over gloo.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _hosts_util import USER_DIR, VOCAB, cli_env, fused_checkpoint, make_data, train_losses
from jam_metaseq import flags as jam_flags
from jam_metaseq.hosts import args as jam_args
from jam_metaseq.hosts.compat import StartCheckpointError, check_start_checkpoint, check_trainer_start

torch.set_num_threads(1)
CPU_FSDP = Path(__file__).resolve().parent / "cpu_fsdp"
BIN = Path(sys.executable).parent
RUN = ["--user-dir", USER_DIR, "--task", "cm3_multimodal", "--criterion", "cm3", "--cpu", "--num-workers", "0",
       "--tokens-per-sample", "32", "--seed", "1", "--arch", "jam_cross_tiny", "--cross-every", "1",
       "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "2",
       "--total-num-update", "10", "--log-format", "json", "--log-interval", "1", "--disable-validation",
       "--no-epoch-checkpoints", "--batch-size", "4", "--max-tokens", "256"]
RESETS = ["--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]


def _cfg(arch: str = "jam_cross_tiny"):
    import argparse

    family, size = jam_args.arch_names()[arch]
    p = argparse.ArgumentParser()
    jam_flags.add_model_args(p)
    ns = p.parse_args([])
    ns.cross_every = 1
    jam_args.apply_arch_defaults(ns, family=family, size=size)
    return jam_flags.config_from_args(ns, vocab_size=VOCAB.size)


@pytest.fixture(scope="module")
def starts(tmp_path_factory) -> dict[str, Path]:
    """A tiny JAM-Cross as one whole file and as 2 FSDP shards (jam-ckpt reshard --fsdp 2)."""
    from checkpoints_tools.ops import CommonOptions, reshard
    from checkpoints_tools.io import OutputSpec

    root = tmp_path_factory.mktemp("fsdpstart")
    whole = fused_checkpoint("jam_cross", root / "whole", use_cli=False)
    out = reshard(whole, opts=CommonOptions(spec=OutputSpec(out_dir=root / "f2", fsdp=2), progress=False,
                                            hash_sources="none"))
    return {"whole": whole, "f2": out / "checkpoint.pt"}


# ---- the start checks (in-process) -----------------------------------------------------------------
@pytest.mark.parametrize("start,shards,message", [
    ("f2", 2, None),
    ("whole", 2, "holds whole (unsharded) tensors, but this fully-sharded run"),
    ("f2", 4, "written as 2 FSDP shard(s) per model part, but the run's data-parallel size is 4"),
    ("f2", 0, "FSDP shards (2 per model part) load only into a fully-sharded run"),
])
def test_fsdp_start_must_fit_the_run(starts, start, shards, message):
    """The shard count must be the run's data-parallel size (a sharded-state run loads one shard
    per rank), and only such a run loads shards; each misfit is one line naming the fix."""
    path = starts[start]
    if start == "f2":  # this rank's file, as the host resolves it
        path = path.with_name("checkpoint-model_part-0-shard0.pt")
    if message is None:
        check_start_checkpoint(path, config=_cfg(), vocab=VOCAB, fsdp_shards=shards)
        return
    with pytest.raises(StartCheckpointError) as e:
        check_start_checkpoint(path, config=_cfg(), vocab=VOCAB, fsdp_shards=shards)
    assert message in str(e.value) and "jam-ckpt reshard" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("suffix,want", [
    ("-model_part-0-shard1", "loads one -model_part-{m}-shard{d} file per rank: write them with jam-ckpt reshard"),
    ("-shard0", "loads one -shard{d} file per rank: write them with jam-ckpt reshard"),
    ("-model_part-0", "start from the whole file with --finetune-from-model"),
])
def test_missing_rank_file_beside_a_whole_one_says_what_to_write(starts, suffix, want):
    """``--restore-file X.pt`` on several processes: the host looks for ``X{suffix}.pt``; when only
    the whole ``X.pt`` is there, the error names the layout the run loads and how to get it."""
    model = SimpleNamespace(jam_config=_cfg(), model_parallel_size=1)
    trainer = SimpleNamespace(get_model=lambda: model, task=SimpleNamespace(vocab=VOCAB), checkpoint_suffix=suffix,
                              data_parallel_world_size=2)
    cfg = SimpleNamespace(restore_file=str(starts["whole"]), finetune_from_model=None, save_dir="/nonexistent")
    with pytest.raises(StartCheckpointError, match="not found; ") as e:
        check_trainer_start(cfg, trainer)
    assert want in str(e.value), str(e.value)


def test_a_shard_given_to_a_model_that_is_not_sharded_is_one_line(starts):
    """``metaseq-validate --path SHARD`` (or any unsharded load) of a fully-sharded run's file: one
    line saying to consolidate it, not a key-by-key mismatch (the host model's ``load_state_dict``,
    shared by both hosts; fairseq's model here)."""
    pytest.importorskip("fairseq")
    from argparse import Namespace

    from jam_metaseq.hosts.fairseq import JamLanguageModel, dictionary_from_manifest

    ns = Namespace(**jam_flags.args_from_config(_cfg().parent))
    jam_args.apply_arch_defaults(ns, family="jam_cross", size="tiny")
    ns.cross_every = 1
    task = Namespace(vocab=VOCAB, target_dictionary=dictionary_from_manifest(VOCAB))
    model = JamLanguageModel.build_model(ns, task)
    shard = torch.load(starts["f2"].with_name("checkpoint-model_part-0-shard0.pt"), weights_only=False)["model"]
    with pytest.raises(StartCheckpointError, match=r"FSDP flat parameters \(\S*flat_param_0\) .* jam-ckpt convert"):
        model.load_state_dict(shard)
    model.load_state_dict(torch.load(starts["whole"], weights_only=False)["model"])  # the whole file loads


# ---- fairseq-train --ddp-backend fully_sharded, two gloo ranks --------------------------------------
def fsdp_env() -> dict[str, str]:
    """A host CLI's environment (``cli_env``) with the CPU FSDP stand-ins first on its path."""
    env = cli_env()
    env["PYTHONPATH"] = f"{CPU_FSDP}:{env['PYTHONPATH']}"
    return env


def fairseq_ranks(argv: list[str], *, world: int = 2, timeout: int = 300) -> list[str]:
    """``fairseq-train ARGV`` as ``world`` gloo processes (fairseq's explicit ranks: it infers no
    CPU world from torchrun) with the CPU FSDP stand-ins; each rank's output."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = fsdp_env()
    procs = [subprocess.Popen(
        [str(BIN / "fairseq-train"), *argv, "--distributed-world-size", str(world), "--distributed-rank", str(r),
         "--distributed-backend", "gloo", "--distributed-no-spawn", "--device-id", "0",
         "--distributed-init-method", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_fairseq_fully_sharded_equals_pytorch_ddp(tmp_path):
    """4 updates at 2 ranks from the same --seed: fully_sharded (with --use-sharded-state and
    --not-fsdp-flatten-parameters: one unflattened shard per rank, fairseq's ``fsdp_metadata``)
    logs pytorch_ddp's losses, and its shards, consolidated by the checkpoint reader, are the
    weights pytorch_ddp wrote, as fairscale's own consolidation has them. Measured: identical to
    the last bit (the same two-rank sums)."""
    pytest.importorskip("fairseq")
    from fairscale.nn.data_parallel import FullyShardedDataParallel

    from checkpoints_tools.readers import open_checkpoint

    data = make_data(tmp_path / "data", n_train=16, n_valid=2)
    common = [str(data), *RUN, "--max-update", "4"]
    ddp = train_losses(fairseq_ranks([*common, "--ddp-backend", "pytorch_ddp", "--save-dir", str(tmp_path / "ddp")])[0])
    fsdp = train_losses(fairseq_ranks([*common, "--ddp-backend", "fully_sharded", "--use-sharded-state",
                                       "--not-fsdp-flatten-parameters", "--save-dir", str(tmp_path / "fsdp")])[0])
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4] and fsdp[4] < fsdp[1] - 0.05  # it trains
    for u in ddp:
        assert fsdp[u] == pytest.approx(ddp[u], abs=1e-3), (u, fsdp[u], ddp[u])
    files = sorted((tmp_path / "fsdp").glob("checkpoint_last-shard*.pt"))
    assert [f.name for f in files] == ["checkpoint_last-shard0.pt", "checkpoint_last-shard1.pt"]
    ref = torch.load(tmp_path / "ddp" / "checkpoint_last.pt", weights_only=False)["model"]
    shards = [torch.load(f, weights_only=False) for f in files]
    theirs = FullyShardedDataParallel.consolidate_shard_weights(
        shard_weights=[s["model"] for s in shards], shard_metadata=[s["fsdp_metadata"] for s in shards])
    ours = open_checkpoint(files[0])
    assert (ours.mp, ours.fsdp) == (1, 2) and set(ours.names()) == set(ref)
    for k, want in ref.items():
        got = ours.get(k)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{k} vs pytorch_ddp: {m}")
        if k in theirs:  # fairscale's consolidation leaves the tied output projection out
            assert torch.equal(got, theirs[k]), k
