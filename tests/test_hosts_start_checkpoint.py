"""Starting checkpoints through the real ``fairseq-train`` (the metaseq twins are in
``test_hosts_metaseq_e2e.py``): a file the run cannot use stops it before the first update with
jam-ckpt's one-line message (``hosts.compat.check_trainer_start``, reading through
``checkpoints_tools.safe_load``), and a legacy (non-zip) torch file trains as the zip one does.
"""

from __future__ import annotations

import fractions
from pathlib import Path

import pytest
import torch

from _hosts_util import USER_DIR, fused_checkpoint, make_data, run_cli, train_losses

pytest.importorskip("fairseq")

RUN = ["--user-dir", USER_DIR, "--task", "cm3_multimodal", "--criterion", "cm3", "--cpu", "--num-workers", "0",
       "--tokens-per-sample", "32", "--seed", "1", "--arch", "jam_uniform_tiny", "--optimizer", "adam",
       "--lr", "3e-3", "--log-format", "json", "--log-interval", "1", "--disable-validation",
       "--batch-size", "4", "--max-update", "1", "--reset-optimizer", "--reset-dataloader", "--reset-meters",
       "--reset-lr-scheduler"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("start")
    return make_data(root / "data", n_train=8, n_valid=2), fused_checkpoint("jam_uniform", root / "fused",
                                                                          use_cli=False)


def _train(data: Path, start: Path, save: Path):
    return run_cli("fairseq-train", str(data), *RUN, "--save-dir", str(save), "--restore-file", str(start),
                   check=False)


@pytest.mark.parametrize("case", ["unsafe_global", "truncated", pytest.param("missing", marks=pytest.mark.slow),
                                  pytest.param("directory", marks=pytest.mark.slow)])
def test_unusable_start_checkpoint_stops_with_one_line(case, setup, tmp_path):
    data, good = setup
    bad = tmp_path / "start.pt"
    if case == "unsafe_global":
        state = torch.load(good, weights_only=False)
        state["extra_state"]["note"] = fractions.Fraction(1, 3)
        torch.save(state, bad)
    elif case == "truncated":
        raw = good.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    elif case == "directory":
        bad.mkdir()
        (bad / "checkpoint.pt").write_bytes(good.read_bytes())
    res = _train(data, bad, tmp_path / "run")
    assert res.returncode != 0
    assert "train_inner" not in res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: ") and str(bad) in last, last
    want = {"unsafe_global": "refusing to unpickle global(s) fractions.Fraction (not on the allow-list)",
            "truncated": "truncated", "missing": "starting checkpoint not found",
            "directory": f"pass one of its files, {bad}/checkpoint.pt"}[case]
    assert want in last, last


@pytest.mark.slow
def test_legacy_format_start_checkpoint_trains_as_the_zip_one(setup, tmp_path):
    data, good = setup
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(good, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    zip_run = _train(data, good, tmp_path / "a")
    legacy_run = _train(data, legacy, tmp_path / "b")
    assert zip_run.returncode == 0 and legacy_run.returncode == 0, legacy_run.stderr[-3000:]
    assert train_losses(legacy_run.stdout + legacy_run.stderr) == train_losses(zip_run.stdout + zip_run.stderr)
    assert 1 in train_losses(zip_run.stdout + zip_run.stderr)
