"""jam-launch dry runs for the paper's stages (JAM §3.1, Table 4) and the batch arithmetic."""

from __future__ import annotations

import shlex

import pytest

from launch.cli import main
from launch.recipes import STAGES
from launch.slurm import LaunchConfig, plan, update_freq


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _dry_run(capsys, *args: str) -> str:
    assert main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def _commands(out: str) -> list[list[str]]:
    lines = out.splitlines()
    return [shlex.split(lines[i + 1]) for i, l in enumerate(lines) if l == "### command:"]


def test_update_freq_hand_computed():
    # 8 * 2**20 tokens over 256 GPUs x 4096 tokens = 8 accumulation steps; 1 * 2**20 over 64 x 4096 = 4.
    assert update_freq(batch_tokens=8 * 2**20, gpus=256, max_tokens=4096, tokens_per_sample=4096) == 8
    assert update_freq(batch_tokens=2**20, gpus=64, max_tokens=4096, tokens_per_sample=4096) == 4
    assert update_freq(batch_tokens=2**20, gpus=64, max_tokens=8192, tokens_per_sample=4096) == 2
    # tensor parallelism: 64 GPUs at MP 2 are 32 replicas
    assert update_freq(batch_tokens=2**20, gpus=64, max_tokens=4096, tokens_per_sample=4096,
                       model_parallel_size=2) == 8


@pytest.mark.parametrize("kwargs, msg", [
    (dict(gpus=24, max_tokens=4096, tokens_per_sample=4096), "does not divide"),
    (dict(gpus=64, max_tokens=5000, tokens_per_sample=4096), "not a multiple of tokens_per_sample"),
    (dict(gpus=64, max_tokens=4096, tokens_per_sample=4096, model_parallel_size=3), "model_parallel_size"),
])
def test_update_freq_refuses(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        update_freq(batch_tokens=2**20, **kwargs)


@pytest.mark.parametrize("host", ["fairseq", "metaseq"])
def test_alignment_dry_run(capsys, host):
    out = _dry_run(capsys, "--stage", "alignment", "--host", host, "--data", "/data/mix",
                   "--save-dir", "/ckpt/align", "--arch", "jam_cross_7b",
                   "--restore-file", "/ckpt/fused/checkpoint.pt")
    (cmd,) = _commands(out)
    assert cmd[0] == f"{host}-train" and cmd[1] == "/data/mix"
    assert _flag(cmd, "--task") == "cm3_multimodal" and _flag(cmd, "--criterion") == "cm3"
    assert float(_flag(cmd, "--lr")) == 3e-5
    assert _flag(cmd, "--warmup-updates") == "500"
    assert _flag(cmd, "--max-update") == "5960"
    assert _flag(cmd, "--distributed-world-size") == "256"
    # global batch = 256 GPUs x 4096 tokens x update_freq = 8M tokens
    assert 256 * int(_flag(cmd, "--max-tokens")) * int(_flag(cmd, "--update-freq")) == 8 * 2**20
    assert _flag(cmd, "--restore-file") == "/ckpt/fused/checkpoint.pt"
    for reset in ("--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"):
        assert reset in cmd
    assert "#SBATCH --nodes=32" in out and "#SBATCH --ntasks-per-node=8" in out
    assert "#SBATCH --job-name=jam-alignment-jam_cross_7b" in out
    assert "srun --label" in out
    if host == "metaseq":
        assert "--use-sharded-state" in cmd and _flag(cmd, "--model-parallel-size") == "1"
    else:
        assert "--use-sharded-state" not in cmd and "--model-parallel-size" not in cmd


@pytest.mark.parametrize("host", ["fairseq", "metaseq"])
def test_instruct_dry_run_keeps_every_epoch(capsys, host):
    out = _dry_run(capsys, "--stage", "instruct", "--host", host, "--data", "/d", "--save-dir", "/s",
                   "--finetune-from-model", "/ckpt/align/checkpoint_last.pt")
    (cmd,) = _commands(out)
    assert float(_flag(cmd, "--lr")) == 1e-5 and _flag(cmd, "--warmup-updates") == "300"
    assert _flag(cmd, "--max-epoch") == "15" and "--max-update" not in cmd
    assert _flag(cmd, "--distributed-world-size") == "64"
    assert 64 * int(_flag(cmd, "--max-tokens")) * int(_flag(cmd, "--update-freq")) == 2**20
    save_flag = "--save-interval-epochs" if host == "metaseq" else "--save-interval"
    assert _flag(cmd, save_flag) == "1" and _flag(cmd, "--keep-last-epochs") == "-1"
    assert _flag(cmd, "--finetune-from-model") == "/ckpt/align/checkpoint_last.pt"
    assert "--restore-file" not in cmd
    assert "#SBATCH --nodes=8" in out


@pytest.mark.parametrize("host", ["fairseq", "metaseq"])
def test_ablation_dry_run_sweeps_cross_every(capsys, host):
    out = _dry_run(capsys, "--stage", "ablation_cross", "--host", host, "--data", "/d", "--save-dir", "/s")
    cmds = _commands(out)
    assert [_flag(c, "--cross-every") for c in cmds] == ["1", "2", "4", "0"]
    for c in cmds:
        # 25B tokens at 8M-token batches
        updates = int(_flag(c, "--max-update"))
        assert abs(updates * 8 * 2**20 - 25e9) < 8 * 2**20
    assert len({_flag(c, "--save-dir") for c in cmds}) == 4
    assert "jam-ablation_cross-jam_cross_7b-nocross" in out


def test_refuses_bad_combinations(capsys):
    assert main(["--stage", "alignment", "--host", "fairseq", "--data", "/d", "--save-dir", "/s",
                 "--gpus", "24", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not divide" in err and err.count("\n") == 1
    assert main(["--stage", "ablation_cross", "--host", "fairseq", "--data", "/d", "--save-dir", "/s",
                 "--arch", "jam_width_7b", "--dry-run"]) == 2
    assert main(["--stage", "alignment", "--host", "fairseq", "--data", "/d", "--save-dir", "/s",
                 "--model-parallel-size", "2", "--dry-run"]) == 2


def test_restore_is_skipped_on_resubmission():
    (job,) = plan(LaunchConfig(stage="alignment", host="fairseq", data="/d", save_dir="/s",
                               restore_file="/w.pt"))
    assert "--restore-file" in job.command
    # the srun line itself must not force the fused weights: they come through START, set only
    # when no checkpoint_last*.pt exists yet
    srun = next(l for l in job.script.splitlines() if l.startswith("srun"))
    assert "--restore-file" not in srun and '"${START[@]}"' in srun
    assert 'checkpoint_last*.pt' in job.script


def test_every_stage_has_paper_numbers():
    assert STAGES["alignment"].max_update * STAGES["alignment"].batch_tokens == pytest.approx(50e9, rel=0.01)
    assert STAGES["instruct"].max_epoch == 15


@pytest.mark.parametrize("host", ["fairseq", "metaseq"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_command_has_each_flag_once(capsys, host, stage):
    """What `jam-launch --dry-run` prints can be read as it is: each flag once per command, also
    when extra flags after -- override the recipe's (they take its place; the host reads the same
    value it read when they were appended)."""
    arch = "jam_cross_7b"
    assert main(["--stage", stage, "--host", host, "--data", "/d", "--save-dir", "/s", "--arch", arch,
                 "--restore-file", "/w.pt", "--dry-run", "--", "--weight-decay", "0.05", "--log-interval", "1",
                 "--ddp-backend", "legacy_ddp", "--decoder-layers", "8", "--no-epoch-checkpoints"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == (4 if stage == "ablation_cross" else 1)
    for cmd in cmds:
        flags = [w for w in cmd if w.startswith("--")]
        assert len(flags) == len(set(flags)), sorted({f for f in flags if flags.count(f) > 1})
        assert _flag(cmd, "--weight-decay") == "0.05" and _flag(cmd, "--log-interval") == "1"
        assert _flag(cmd, "--ddp-backend") == "legacy_ddp" and _flag(cmd, "--decoder-layers") == "8"
        assert cmd[-1] == "--no-epoch-checkpoints"


def test_merge_flags_replaces_in_place_and_appends_new_flags():
    from launch.slurm import merge_flags

    cmd = ["fairseq-train", "/d", "--lr", "1e-3", "--bf16", "--adam-betas", "(0.9, 0.95)", "--seed", "1"]
    out = merge_flags(cmd, ["--adam-betas", "(0.9, 0.98)", "--cpu", "--bf16", "--distributed-port", "-1",
                            "--seed", "2", "--seed", "3"])
    assert out == ["fairseq-train", "/d", "--lr", "1e-3", "--bf16", "--adam-betas", "(0.9, 0.98)", "--seed", "3",
                   "--cpu", "--distributed-port", "-1"]
    assert merge_flags(cmd, []) == cmd


def test_fairseq_fully_sharded_defaults_to_fp16_and_refuses_bf16():
    """fairseq's trainer refuses --bf16 with --ddp-backend fully_sharded: the default follows the host,
    an explicit bf16 there is one line naming the ways out."""
    base = dict(stage="alignment", data="/d", save_dir="/s")
    (job,) = plan(LaunchConfig(host="fairseq", **base))
    assert "--fp16" in job.command and "--bf16" not in job.command
    (job,) = plan(LaunchConfig(host="metaseq", **base))
    assert "--bf16" in job.command
    (job,) = plan(LaunchConfig(host="fairseq", ddp_backend="legacy_ddp", **base))
    assert "--bf16" in job.command
    with pytest.raises(ValueError, match="refuses --bf16.*--precision fp16"):
        LaunchConfig(host="fairseq", precision="bf16", **base)
