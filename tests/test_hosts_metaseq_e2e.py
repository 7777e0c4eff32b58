"""End-to-end training of JAM models through the real ``metaseq-train`` / ``metaseq-validate``
CLIs (paper §3.1 Training: "All our training procedures are implemented using Metaseq"), on CPU:
tiny configs, temp dirs, gloo, two processes via torchrun for tensor parallelism.

The twins of ``test_hosts_e2e.py`` (fairseq): every arch trains, checkpoints and resumes at
model-parallel size 1; jam_cross and jam_width at size 2 log the losses of the size-1 run;
jam-ckpt's --mp 1/--mp 2 outputs load strictly at their size through --finetune-from-model and
--restore-file; metaseq's own size-2 parts, converted by jam-ckpt to size 1, validate to the same
numbers; metaseq-validate reads trained checkpoints and jam-ckpt outputs; jam-launch's metaseq
command is metaseq-train's, flag for flag; bad starting checkpoints stop before training with one
line. ``metaseq`` marker: runs in the metaseq environment (``./jam.sh test`` builds it when
the CPU build of metaseq is available), skips elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from _hosts_util import (
    USER_DIR, VOCAB, fused_checkpoint, jam_ckpt_fuse, make_conversation_data, make_data, make_parents, run_cli,
    train_losses, valid_stats,
)

pytestmark = pytest.mark.metaseq

if importlib.util.find_spec("metaseq") is None or importlib.util.find_spec("metaseq.cli") is None:
    pytest.skip("facebookresearch/metaseq is not installed", allow_module_level=True)

CPU = ["--cpu", "--distributed-backend", "gloo", "--ddp-backend", "pytorch_ddp", "--num-workers", "0"]
COMMON = ["--user-dir", USER_DIR, "--task", "cm3_multimodal", "--criterion", "cm3", *CPU,
          "--tokens-per-sample", "32", "--seed", "1"]
TRAIN = ["--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "polynomial_decay",
         "--warmup-updates", "3", "--total-num-update", "30", "--log-format", "json",
         "--log-interval", "1", "--disable-validation", "--batch-size", "4", "--max-tokens", "256"]
RESETS = ["--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]
VALIDATE = ["--user-dir", USER_DIR, "--task", "cm3_multimodal", *CPU, "--batch-size", "4",
            "--tokens-per-sample", "32", "--valid-subset", "valid", "--log-format", "json"]
TOL = 2e-3
"""Loss agreement between model-parallel sizes, in bits on the logged (3-decimal) loss: the sizes
differ only in the order of the sums their all-reduces split."""


def arch(family: str) -> list[str]:
    return ["--arch", f"{family}_tiny"] + (["--cross-every", "1"] if family == "jam_cross" else [])


def host(tool: str, *argv: str, mp: int = 1, check: bool = True):
    """A metaseq CLI: one process, or ``mp`` model-parallel ones through torchrun."""
    if mp == 1:
        return run_cli(tool, *argv, check=check)
    return run_cli("torchrun", "--nproc_per_node", str(mp), "--master_port", str(_free_port()),
                   str(Path(sys.executable).parent / tool), *argv, "--model-parallel-size", str(mp), check=check)


def train(data: Path, save_dir: Path, *args: str, mp: int = 1, check: bool = True):
    return host("metaseq-train", str(data), *COMMON, *TRAIN, "--save-dir", str(save_dir), *args, mp=mp, check=check)


def validate(data: Path, path: Path, *, mp: int = 1) -> dict[str, str]:
    res = host("metaseq-validate", str(data), "--path", str(path), *VALIDATE, mp=mp)
    return valid_stats(res.stdout + res.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def updates_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"])


def assert_ppl(stats: dict[str, str], *, trained: bool = True) -> None:
    """Text and image perplexity reported separately, finite, and for a trained model below the
    vocabulary size (random fused parents sit just above it)."""
    ppl = {k: float(stats[k]) for k in ("ppl", "text_ppl", "image_ppl")}
    top = VOCAB.size if trained else 2 * VOCAB.size
    assert all(math.isfinite(v) and 1.0 < v < top for v in ppl.values()), ppl


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("msdata"))


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict[int, Path]:
    """Two tiny parents -> ``jam-ckpt cross`` at --mp 1 and --mp 2: {mp: OUT/checkpoint.pt}."""
    root = tmp_path_factory.mktemp("fused")
    llm, img = make_parents(root / "parents")
    return {mp: jam_ckpt_fuse("jam_cross", llm=llm, img=img, out=root / f"cross-mp{mp}", mp=mp) for mp in (1, 2)}


# ---- every arch at model-parallel size 1: trains, checkpoints, resumes ---------------------------
@pytest.mark.parametrize("family", ["jam_uniform", "jam_width", "jam_cross"])
def test_train_checkpoint_resume(family, data, tmp_path):
    start = fused_checkpoint(family, tmp_path / "start")
    run = [*arch(family), "--max-update", "20", "--save-interval-updates", "10", "--finetune-from-model", str(start)]
    full = tmp_path / "full"
    curve = train_losses(train(data, full, *run).stdout)
    assert sorted(curve) == list(range(1, 21)), sorted(curve)
    first, last = sum(curve[u] for u in range(1, 6)) / 5, sum(curve[u] for u in range(16, 21)) / 5
    assert last < first - 0.5, f"loss did not fall: first {first:.3f}, last {last:.3f}"
    assert updates_of(full / "checkpoint_10.pt") == 10 and updates_of(full / "checkpoint_last.pt") == 20

    # The same command again, in a save dir as a run stopped after update 10 leaves it (metaseq's
    # checkpoint_last.pt is a link to the newest checkpoint_N.pt): it resumes there, not from
    # --finetune-from-model, and logs the uninterrupted run's losses.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "checkpoint_10.pt", resumed / "checkpoint_10.pt")
    (resumed / "checkpoint_last.pt").symlink_to(resumed / "checkpoint_10.pt")
    again = train_losses(train(data, resumed, *run).stdout)
    assert sorted(again) == list(range(11, 21)), sorted(again)
    for u in again:
        assert again[u] == pytest.approx(curve[u], abs=TOL), (u, again[u], curve[u])
    assert updates_of(resumed / "checkpoint_last.pt") == 20

    if family == "jam_cross":  # metaseq-validate on a trained checkpoint
        assert_ppl(validate(data, full / "checkpoint_last.pt"))


# ---- tensor parallelism ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch_runs(data, tmp_path_factory) -> dict[tuple[str, int], tuple[Path, dict[int, float]]]:
    """jam_cross and jam_width from --seed 1 alone (no starting weights), 3 updates, at sizes 1 and 2."""
    root = tmp_path_factory.mktemp("scratch")
    out = {}
    for family in ("jam_cross", "jam_width"):
        for mp in (1, 2):
            save = root / f"{family}-mp{mp}"
            out[family, mp] = (save, train_losses(train(data, save, *arch(family), "--max-update", "3", mp=mp).stdout))
    return out


@pytest.mark.parametrize("family", ["jam_cross", "jam_width"])
def test_model_parallel_2_logs_the_size_1_losses(family, scratch_runs):
    """From scratch, so the size-2 model must also start as the size-1 one (same --seed): the
    first 3 losses agree within TOL; each rank writes its -model_part-r file, loadable by rank."""
    (one_dir, one), (two_dir, two) = scratch_runs[family, 1], scratch_runs[family, 2]
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for u in one:
        assert two[u] == pytest.approx(one[u], abs=TOL), (u, two[u], one[u])
    assert sorted(p.name for p in two_dir.glob("checkpoint_last*.pt")) == \
        ["checkpoint_last-model_part-0.pt", "checkpoint_last-model_part-1.pt"]
    assert updates_of(two_dir / "checkpoint_last-model_part-1.pt") == 3


def test_jam_ckpt_parts_have_the_keys_and_shapes_of_metaseqs_own(scratch_runs, fused):
    """What a size-2 metaseq-train writes and what jam-ckpt cross --mp 2 writes are the same
    tensors: names and shapes, file by file."""
    two_dir = scratch_runs["jam_cross", 2][0]
    for r in range(2):
        ours = torch.load(two_dir / f"checkpoint_last-model_part-{r}.pt", weights_only=False)["model"]
        tool = torch.load(str(fused[2]).replace(".pt", f"-model_part-{r}.pt"), weights_only=False)["model"]
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in tool.items()}


def test_jam_ckpt_outputs_start_runs_at_both_sizes(data, fused, tmp_path):
    """jam-ckpt cross --mp 1 / --mp 2 outputs, given to the run of that size by
    --finetune-from-model (strict load) and by --restore-file with the reset flags: all four
    runs log the same first 3 losses."""
    runs = {}
    for mp in (1, 2):
        runs["finetune", mp] = train(data, tmp_path / f"ft{mp}", *arch("jam_cross"), "--max-update", "3",
                                     "--finetune-from-model", str(fused[mp]), mp=mp)
        runs["restore", mp] = train(data, tmp_path / f"rs{mp}", *arch("jam_cross"), "--max-update", "3",
                                    "--restore-file", str(fused[mp]), *RESETS, mp=mp)
    curves = {k: train_losses(r.stdout) for k, r in runs.items()}
    ref = curves["finetune", 1]
    assert sorted(ref) == [1, 2, 3]
    for k, c in curves.items():
        assert sorted(c) == [1, 2, 3], k
        for u in ref:
            assert c[u] == pytest.approx(ref[u], abs=TOL), (k, u, c[u], ref[u])
    assert "loading pretrained model from" in runs["finetune", 2].stdout


def test_model_parallel_parts_convert_to_one_file_that_validates_the_same(data, scratch_runs, tmp_path):
    """metaseq's own size-2 parts -> jam-ckpt convert -> one file: metaseq-validate on it (one
    process) reports the numbers the size-2 validation (two processes) reports."""
    two_dir = scratch_runs["jam_cross", 2][0]
    on_two = validate(data, two_dir / "checkpoint_last.pt", mp=2)
    run_cli("jam-ckpt", "convert", str(two_dir / "checkpoint_last-model_part-0.pt"), "--to", "metaseq",
            "-o", str(tmp_path / "one"), "--quiet")
    on_one = validate(data, tmp_path / "one" / "checkpoint.pt")
    assert_ppl(on_one)
    assert on_one["bsz"] == on_two["bsz"] == "20"  # every validation item, no batch dropped
    for k in ("loss", "text_loss", "image_loss"):
        assert float(on_one[k]) == pytest.approx(float(on_two[k]), abs=TOL), (k, on_one[k], on_two[k])


def test_validate_reads_a_jam_ckpt_output(data, fused):
    """The cfg jam-ckpt writes lets metaseq-validate rebuild task, criterion and model."""
    assert_ppl(validate(data, fused[1]), trained=False)


# ---- the Llama family (issue 23) ------------------------------------------------------------------
def test_llama_cross_from_hf_parents_logs_the_same_losses_at_mp_1_and_2(data, tmp_path):
    """Two HF ``LlamaForCausalLM`` directories -> jam-ckpt cross --mp 1 / --mp 2 -> metaseq-train
    --arch jam_cross_llama_tiny at that size: grouped k/v heads (2 of 4) split whole per rank,
    gate/up column-parallel, down row-parallel, the untied head column-parallel next to its
    embedding, RMSNorm replicated; the size-2 run logs the size-1 losses."""
    from _hosts_util import hf_parents

    llm, img = hf_parents(tmp_path / "hf", "llama")
    curves = {}
    for mp in (1, 2):
        start = jam_ckpt_fuse("jam_cross", llm=llm, img=img, out=tmp_path / f"cross-mp{mp}", mp=mp)
        res = train(data, tmp_path / f"run{mp}", "--arch", "jam_cross_llama_tiny", "--cross-every", "1",
                    "--max-update", "3", "--finetune-from-model", str(start), mp=mp)
        curves[mp] = train_losses(res.stdout)
    assert sorted(curves[1]) == sorted(curves[2]) == [1, 2, 3]
    for u in curves[1]:
        assert curves[2][u] == pytest.approx(curves[1][u], abs=TOL), (u, curves[2][u], curves[1][u])


def test_llama_beside_chameleon_cross_logs_the_same_losses_at_mp_1_and_2(data, tmp_path):
    """JAM-Cross across families (issue 24): an HF Llama LLM and an HF Chameleon image parent (its
    per-head q/k norms in the image branch only) -> jam-ckpt cross --mp 1 / --mp 2 -> metaseq-train
    --arch jam_cross_llama_tiny --img-qk-norm layernorm_per_head: the q/k norms split by heads with
    their projections' rows; the size-2 run logs the size-1 losses."""
    from _hosts_util import llama_chameleon_parents

    llm, img = llama_chameleon_parents(tmp_path / "hf")
    curves = {}
    for mp in (1, 2):
        start = jam_ckpt_fuse("jam_cross", llm=llm, img=img, out=tmp_path / f"cross-mp{mp}", mp=mp)
        res = train(data, tmp_path / f"run{mp}", "--arch", "jam_cross_llama_tiny", "--cross-every", "1",
                    "--img-qk-norm", "layernorm_per_head", "--max-update", "3", "--finetune-from-model", str(start),
                    mp=mp)
        curves[mp] = train_losses(res.stdout)
    assert sorted(curves[1]) == sorted(curves[2]) == [1, 2, 3]
    for u in curves[1]:
        assert curves[2][u] == pytest.approx(curves[1][u], abs=TOL), (u, curves[2][u], curves[1][u])


def test_a_model_parallel_size_that_splits_a_kv_head_stops_with_one_line(data, tmp_path):
    """Gemma's tiny parent has one k/v head: two model-parallel ranks cannot each hold whole ones."""
    res = train(data, tmp_path / "run", "--arch", "jam_cross_gemma_tiny", "--cross-every", "1", "--max-update", "1",
                mp=2, check=False)
    assert res.returncode != 0 and "train_inner" not in res.stdout
    lines = [re.sub(r"^\[rank\d+\]: ", "", line) for line in res.stderr.splitlines()]
    errors = [line for line in lines if line.startswith("metaseq-train: error: ")]
    assert errors and "model-parallel size 2 does not divide its k/v heads (num_key_value_heads) (1)" in errors[0], \
        res.stderr[-3000:]
    assert "ModelSetupError" not in res.stderr  # no traceback of ours


# ---- jam-launch --host metaseq ---------------------------------------------------------------------
def _dry_run_command(*flags: str) -> list[str]:
    res = run_cli("jam-launch", "--host", "metaseq", "--data", "/data/jam", "--save-dir", "/ck/jam",
                  "--restore-file", "/ck/fused/checkpoint.pt", *flags, "--dry-run")
    lines = res.stdout.splitlines()
    return shlex.split(lines[lines.index("### command:") + 1])


def _same(text: str, parsed) -> bool:
    if isinstance(parsed, list):
        return len(parsed) == 1 and _same(text, parsed[0])
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        return float(text) == float(parsed)
    return str(parsed) == text


@pytest.mark.parametrize("stage", ["alignment", "instruct", "ablation_cross"])
def test_launch_command_is_metaseq_trains_flag_for_flag(stage):
    """metaseq-train's own parser takes every flag jam-launch writes, each with its value."""
    from metaseq import options

    from jam_metaseq.hosts import register_hosts

    register_hosts(import_hosts=True)
    cmd = _dry_run_command("--stage", stage, "--model-parallel-size", "2")
    assert cmd[0] == "metaseq-train"
    argv = [a for i, a in enumerate(cmd[1:]) if not (a == "--user-dir" or cmd[i] == "--user-dir")]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    i = 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--"):
            i += 1
            continue
        dest = flag[2:].replace("-", "_")
        assert hasattr(args, dest), f"metaseq-train has no {flag}"
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        if value is None:
            assert getattr(args, dest) is True, (flag, getattr(args, dest))
        else:
            assert _same(value, getattr(args, dest)), (flag, value, getattr(args, dest))
        i += 2 if value is not None else 1
    assert args.model_parallel_size == 2 and args.use_sharded_state and args.ddp_backend == "fully_sharded"


def test_launch_command_trains_with_tiny_sizes(data, fused, tmp_path):
    """The alignment command as written, in one process: paths and sizes swapped, the GPU-only
    flags swapped for CPU ones (``_launch_cpu.cpu_argv``, the swap the fully-sharded script runs
    of ``test_hosts_metaseq_fsdp.py`` use), pytorch_ddp on one process; trains 2 updates from
    jam-ckpt's output."""
    from _launch_cpu import cpu_argv

    cmd = _dry_run_command("--stage", "alignment")
    paths = {"/data/jam": str(data), "/ck/jam": str(tmp_path / "run"), "/ck/fused/checkpoint.pt": str(fused[1])}
    values = {"--arch": "jam_cross_tiny", "--tokens-per-sample": "32", "--max-tokens": "128", "--batch-size": "4",
              "--update-freq": "2", "--max-update": "2", "--total-num-update": "2", "--ddp-backend": "pytorch_ddp",
              "--distributed-world-size": "1"}
    run_cli("metaseq-train", *cpu_argv([paths.get(a, a) for a in cmd[1:]], values=values), "--cross-every", "1")
    assert updates_of(tmp_path / "run" / "checkpoint_last.pt") == 2


# ---- instruction tuning on conversations (issue 25): the pipeline's instruct stage on this host ----------
def test_instruct_run_on_conversations(data, fused, tmp_path):
    """``jam run``'s instruct stage with ``host: metaseq``: ``jam-ckpt extend-vocab
    --conversation-tokens`` on the fused model (the stage's ``instruct/<variant>/start``), then the
    stage's own training command for this host (``pipeline.train.host_command`` on an instruct
    ``TrainJob``: ``--instruction``, the instruct + caption mixture, fully sharded on a GPU) run on
    CPU the way the launch tests run jam-launch's (``cpu_argv``: GPU-only flags dropped, tiny sizes,
    plain DDP): metaseq reads the conversations (binarized with the conversation tokens) and the
    caption data binarized before them under the grown vocabulary, and trains."""
    from _launch_cpu import cpu_argv
    from jam_metaseq.pipeline.spec import quickstart_plan
    from jam_metaseq.pipeline.train import TrainJob, host_command

    conv = make_conversation_data(tmp_path / "data", base=data)
    start = tmp_path / "start"
    assert run_cli("jam-ckpt", "extend-vocab", str(fused[1]), "--conversation-tokens", "-o", str(start),
                   "--quiet").returncode == 0
    plan = dataclasses.replace(quickstart_plan(device="cuda"), host="metaseq")
    job = TrainJob(desc="instruct", data=conv, save_dir=tmp_path / "run", arch="jam_cross_tiny",
                   model_flags=["--cross-every", "1"], optim=plan.instruct, updates=3, tokens_per_sample=32, seed=1,
                   restore=start / "checkpoint.pt", mixture={"instruct": 1.0, "caption": 1.0}, instruction=True)
    cmd = host_command(job, plan=plan, gpus=1)
    assert cmd[0] == "metaseq-train" and "--instruction" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--mixture") + 1] == "instruct=1,caption=1"
    assert cmd[cmd.index("--ddp-backend") + 1] == "fully_sharded"
    values = {"--ddp-backend": "pytorch_ddp", "--max-tokens": "128", "--batch-size": "4", "--log-interval": "1"}
    res = run_cli("metaseq-train", *cpu_argv(cmd[1:], values={k: v for k, v in values.items() if k in cmd}))
    curve = train_losses(res.stdout + res.stderr)
    assert sorted(curve) == [1, 2, 3] and all(math.isfinite(v) for v in curve.values()), curve
    assert updates_of(tmp_path / "run" / "checkpoint_last.pt") == 3


# ---- starting checkpoints that cannot be used: one line, before training -----------------------------
@pytest.mark.parametrize("case", ["unsafe_global", "truncated", "legacy_format", "consolidated_at_mp2"])
def test_bad_start_checkpoint(case, data, fused, tmp_path):
    import fractions

    state = torch.load(fused[1], weights_only=False)
    bad = tmp_path / "bad" / "start.pt"
    bad.parent.mkdir()
    mp = 1
    if case == "unsafe_global":
        state["extra_state"]["note"] = fractions.Fraction(1, 3)
        torch.save(state, bad)
    elif case == "truncated":
        raw = Path(fused[1]).read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    elif case == "legacy_format":
        torch.save(state, bad, _use_new_zipfile_serialization=False)
    else:
        shutil.copy(fused[1], bad)
        mp = 2
    res = train(data, tmp_path / "run", *arch("jam_cross"), "--max-update", "1", "--restore-file", str(bad),
                *RESETS, mp=mp, check=False)
    if case == "legacy_format":  # read by the same loader as jam-ckpt: trains as the zip file does
        assert res.returncode == 0, res.stderr[-3000:]
        assert 1 in train_losses(res.stdout)
        return
    assert res.returncode != 0
    assert "train_inner" not in res.stdout + res.stderr
    lines = [re.sub(r"^\[rank\d+\]: ", "", line) for line in res.stderr.splitlines()]  # torchrun's prefix
    errors = [line for line in lines if line.startswith("metaseq-train: error: ")]
    assert errors, res.stderr[-3000:]
    assert "StartCheckpointError" not in res.stderr  # no traceback of ours
    want = {"unsafe_global": "refusing to unpickle global(s) fractions.Fraction",
            "truncated": str(bad),
            "consolidated_at_mp2": "jam-ckpt reshard"}[case]
    assert want in errors[0], errors[0]
