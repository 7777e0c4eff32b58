"""Fully-sharded training (``--ddp-backend fully_sharded``, fairscale FSDP) through the real
``metaseq-train`` / ``metaseq-validate`` on CPU: torchrun, gloo, tiny JAM models (docs/METASEQ.md,
"What runs where"; the fairseq twin is ``test_hosts_fsdp.py``).

Every training run here is a ``jam-launch --dry-run`` script executed for real (``_launch_cpu``:
bash runs the script, a stand-in ``srun`` starts its command as torchrun processes with the
GPU-only flags swapped for CPU ones). One module-scoped set of runs (``Runs``, each started the
first time a test needs it) serves every assertion:

- per arch, 2 ranks, 4 updates from the same fused parents: ``fsdp`` (fully_sharded,
  --use-sharded-state, from ``jam-ckpt --fsdp 2``) and ``ddp`` (pytorch_ddp, from the whole
  ``jam-ckpt`` file): equal losses and equal weights;
- JAM-Cross: the FSDP script again on a copy of the run as a kill after update 2 leaves it (it
  resumes at update 3 and logs the same losses and weights); the update-4 shards resharded by ``jam-ckpt`` to
  MP 2 x FSDP 2 start a 4-process run whose losses and weights equal an MP 2 run's (2 processes,
  ``--update-freq 2``: the same samples per update); the consolidated shards validate to the loss
  the fully-sharded run reported on its shards.

``metaseq`` marker: runs in the metaseq environment (docs/METASEQ.md, "Trying it without a GPU").
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from _hosts_util import VOCAB, cli_env, make_data, make_parents, run_cli, train_losses, valid_stats
from _launch_cpu import dry_run, run_script

pytestmark = pytest.mark.metaseq

if importlib.util.find_spec("metaseq") is None or importlib.util.find_spec("fairscale") is None:
    pytest.skip("facebookresearch/metaseq with fairscale is not installed", allow_module_level=True)

FAMILIES = ("jam_uniform", "jam_width", "jam_cross")
TINY = {"--update-freq": "1", "--max-update": "4", "--total-num-update": "10", "--warmup-updates": "2",
        "--lr": "0.003", "--save-interval-updates": "2", "--log-interval": "1"}
"""Values swapped into the launcher's alignment command: its recipe's batch (8M tokens), length and
learning rate are a cluster's."""
DDP = {"--ddp-backend": "pytorch_ddp"}
LOSS_TOL = 1e-3
"""On the logged (3-decimal) losses; the runs agree far below that (see each test)."""
WEIGHT_TOL = 1e-5
"""Max |difference| of two runs' weights after a few updates that differ only in the order of
their sums (measured <= 3.1e-7); training moves them ~5e-3."""


def _jam_ckpt(*argv: str) -> None:
    import contextlib
    import io

    from checkpoints_tools.cli import main

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the output directory
        assert main([*argv, "--quiet"]) == 0, argv


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("fsdpdata"), n_train=24, n_valid=4)


@pytest.fixture(scope="module")
def starts(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Two tiny parents fused by jam-ckpt per arch, as one whole file and as 2 FSDP shards:
    {(family, "whole" | "f2"): OUT/checkpoint.pt}."""
    root = tmp_path_factory.mktemp("fsdpstart")
    llm, img = make_parents(root / "parents")
    VOCAB.save(root / "vocab.json")
    verbs = {"jam_uniform": ["merge", str(llm), str(img)],
             "jam_width": ["widen", "--llm", str(llm), "--img", str(img), "--init", "copy"],
             "jam_cross": ["cross", "--llm", str(llm), "--img", str(img), "--cross-every", "1"]}
    out = {}
    for family, verb in verbs.items():
        whole = root / family / "whole"
        _jam_ckpt(*verb, "--vocab", str(root / "vocab.json"), "-o", str(whole))
        _jam_ckpt("reshard", str(whole / "checkpoint.pt"), "--fsdp", "2", "-o", str(root / family / "f2"))
        out[family, "whole"], out[family, "f2"] = whole / "checkpoint.pt", root / family / "f2" / "checkpoint.pt"
    return out


def launch(family: str, *, data: Path, save: Path, start: tuple[str, Path], gpus: int = 2,
           mp: int = 1) -> tuple[str, Path]:
    """``jam-launch --stage alignment --host metaseq --dry-run`` for a tiny arch on ``gpus``
    processes: (its sbatch script, the run's save dir: with --cross-every the launcher names a
    subdirectory of SAVE after the job)."""
    flags = ["--stage", "alignment", "--host", "metaseq", "--data", str(data), "--save-dir", str(save),
             "--arch", f"{family}_tiny", "--tokens-per-sample", "32", "--max-tokens", "128", "--gpus", str(gpus),
             "--gpus-per-node", str(gpus), "--model-parallel-size", str(mp), start[0], str(start[1])]
    command, script = dry_run(*flags, *(["--cross-every", "1"] if family == "jam_cross" else []))
    return script, Path(command[command.index("--save-dir") + 1])


class Runs:
    """The module's training runs, each started the first time a test asks for it."""

    def __init__(self, root: Path, data: Path, starts: dict) -> None:
        self.root, self.data, self.starts = root, data, starts
        self.done: dict[str, tuple[str, Path]] = {}
        self.seconds: dict[str, float] = {}

    def _run(self, name: str, script: str, *, nproc: int, values: dict, drop: tuple[str, ...] = ()) -> str:
        import time

        t = time.perf_counter()
        res = run_script(script, workdir=self.root / f"{name}.job", nproc=nproc, values=values, drop=drop,
                         env=cli_env())
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        assert res.returncode == 0, f"{name}:\n{res.stdout[-4000:]}"
        return res.stdout

    def get(self, name: str) -> tuple[str, Path]:
        """(output, save dir) of run ``name``: ``fsdp-FAMILY``, ``ddp-FAMILY``, ``resumed``,
        ``mp2``, ``mp2xfsdp2``."""
        if name in self.done:
            return self.done[name]
        kind, _, family = name.partition("-")
        if kind == "fsdp":
            script, save = launch(family, data=self.data, save=self.root / name,
                                  start=("--restore-file", self.starts[family, "f2"]))
            out = self._run(name, script, nproc=2, values=TINY)
        elif kind == "ddp":
            script, save = launch(family, data=self.data, save=self.root / name,
                                  start=("--finetune-from-model", self.starts[family, "whole"]))
            out = self._run(name, script, nproc=2, values={**TINY, **DDP}, drop=("--use-sharded-state",))
        elif name == "resumed":
            out, save = self.resume()
        else:
            out, save = self.model_parallel(name)
        self.done[name] = (out, save)
        return out, save

    def resume(self) -> tuple[str, Path]:
        """jam_cross's FSDP run as a kill right after its update-2 save leaves it (a copy of its
        save dir without the update-4 files, ``checkpoint_last`` pointing at update 2), then the
        same jam-launch script for that dir run again."""
        _, full = self.get("fsdp-jam_cross")
        script, save = launch("jam_cross", data=self.data, save=self.root / "resumed",
                              start=("--restore-file", self.starts["jam_cross", "f2"]))
        shutil.copytree(full, save, symlinks=True, ignore=shutil.ignore_patterns("checkpoint_4*", "checkpoint_last*"))
        for r in range(2):
            (save / f"checkpoint_last-model_part-0-shard{r}.pt").symlink_to(save / f"checkpoint_2-model_part-0-shard{r}.pt")
        return self._run("resumed", script, nproc=2, values=TINY), save

    def model_parallel(self, name: str) -> tuple[str, Path]:
        """From jam_cross's update-4 shards resharded by jam-ckpt: ``mp2`` (MP 2, pytorch_ddp,
        2 processes, --update-freq 2) or ``mp2xfsdp2`` (MP 2 x FSDP 2, 4 processes), 3 updates."""
        _, fsdp = self.get("fsdp-jam_cross")
        src = fsdp / "checkpoint_4-model_part-0-shard0.pt"
        three = {**TINY, "--max-update": "3", "--save-interval-updates": "3"}
        if name == "mp2":
            _jam_ckpt("reshard", str(src), "--mp", "2", "-o", str(self.root / "start-mp2"))
            script, save = launch("jam_cross", data=self.data, save=self.root / name, gpus=2, mp=2,
                                  start=("--restore-file", self.root / "start-mp2" / "checkpoint.pt"))
            return self._run(name, script, nproc=2, values={**three, **DDP, "--update-freq": "2"},
                             drop=("--use-sharded-state",)), save
        _jam_ckpt("reshard", str(src), "--mp", "2", "--fsdp", "2", "-o", str(self.root / "start-mp2xfsdp2"))
        script, save = launch("jam_cross", data=self.data, save=self.root / name, gpus=4, mp=2,
                              start=("--restore-file", self.root / "start-mp2xfsdp2" / "checkpoint.pt"))
        return self._run(name, script, nproc=4, values=three), save


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, starts):
    r = Runs(tmp_path_factory.mktemp("fsdpruns"), data, starts)
    yield r
    print("\nmetaseq FSDP runs, seconds:", json.dumps({k: round(v, 1) for k, v in r.seconds.items()}))


def _read(path: Path) -> dict[str, torch.Tensor]:
    from checkpoints_tools.readers import open_checkpoint

    return dict(open_checkpoint(path).items())


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:4]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- fully sharded = pytorch_ddp, for every arch ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fully_sharded_equals_pytorch_ddp(family, runs, starts):
    """2 gloo ranks, 4 updates from one jam-ckpt fusion: the fully-sharded run (from jam-ckpt's
    2 FSDP shards, one per rank) logs the pytorch_ddp run's losses (from jam-ckpt's whole file),
    writes one shard per rank and update, and its shards hold the pytorch_ddp run's weights.
    Measured max |difference| after 4 updates: 0 (jam_uniform), 1.1e-7 (jam_cross), 3.1e-7
    (jam_width): the gradient-norm clip sums the squares over shards in another order; the
    weights moved ~5e-3 from the start, and a wrong shard or unit shows at that scale."""
    out_f, fsdp = runs.get(f"fsdp-{family}")
    out_d, ddp = runs.get(f"ddp-{family}")
    lf, ld = train_losses(out_f), train_losses(out_d)
    assert sorted(lf) == sorted(ld) == [1, 2, 3, 4]
    for u in ld:
        assert lf[u] == pytest.approx(ld[u], abs=LOSS_TOL), (u, lf[u], ld[u])
    assert sorted(p.name for p in fsdp.glob("checkpoint_*.pt")) == sorted(
        f"checkpoint_{n}-model_part-0-shard{r}.pt" for n in ("2", "4", "last") for r in range(2))
    assert f"Loaded checkpoint {str(starts[family, 'f2']).replace('.pt', '-model_part-0-shard0.pt')}" in out_f
    assert "loading pretrained model" in out_d
    weights = _read(fsdp / "checkpoint_4-model_part-0-shard0.pt")
    assert _max_diff(weights, _read(starts[family, "whole"])) > 1e-3  # it trained
    assert _max_diff(weights, _read(ddp / "checkpoint_4-model_part-0.pt")) <= WEIGHT_TOL


def test_the_launch_script_resumes_a_killed_run(runs):
    """The jam-launch script run again on a save dir as a kill after the update-2 save leaves
    it: the script drops --restore-file (checkpoint_last exists), metaseq loads each rank's
    shard, and the run continues at update 3 with the uninterrupted run's losses and weights
    (measured: bitwise equal)."""
    out_full, full = runs.get("fsdp-jam_cross")
    out, save = runs.get("resumed")
    assert f"Loaded checkpoint {save}/checkpoint_last-model_part-0-shard0.pt (epoch 1 @ 2 updates)" in out
    full_l, again = train_losses(out_full), train_losses(out)
    assert sorted(again) == [3, 4]
    for u in again:
        assert again[u] == pytest.approx(full_l[u], abs=LOSS_TOL), (u, again[u], full_l[u])
    assert _max_diff(_read(save / "checkpoint_last-model_part-0-shard0.pt"),
                     _read(full / "checkpoint_4-model_part-0-shard0.pt")) <= 1e-6


# ---- our tools on the files metaseq wrote ------------------------------------------------------------
def test_jam_ckpt_reads_and_writes_the_run_s_shards(runs, tmp_path, capsys):
    """jam-ckpt inspect / verify / convert read the shards metaseq wrote; ``reshard --fsdp 2`` of
    the consolidated weights writes those very files back: the same tensors under the same keys
    and the same ``shard_metadata`` (one unit per block, the rest in the root unit)."""
    from checkpoints_tools.cli import main

    _, fsdp = runs.get("fsdp-jam_cross")
    shard = fsdp / "checkpoint_4-model_part-0-shard0.pt"
    assert main(["inspect", str(shard), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["mp"], info["fsdp_shards"], info["arch"]) == (1, 2, "jam_cross")
    assert main(["verify", str(shard), "--no-manifest"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    _jam_ckpt("convert", str(shard), "--to", "metaseq", "-o", str(tmp_path / "one"))
    _jam_ckpt("reshard", str(tmp_path / "one" / "checkpoint.pt"), "--fsdp", "2", "-o", str(tmp_path / "back"))
    for r in range(2):
        ours = torch.load(tmp_path / "back" / f"checkpoint-model_part-0-shard{r}.pt", weights_only=False)
        theirs = torch.load(fsdp / f"checkpoint_4-model_part-0-shard{r}.pt", weights_only=False)
        assert ours["shard_metadata"] == theirs["shard_metadata"]
        assert set(ours["model"]) == set(theirs["model"])
        for k, v in theirs["model"].items():
            assert torch.equal(ours["model"][k], v), k
    units = [u["fsdp_path"] for u in theirs["shard_metadata"]["param_metadata"]]
    assert units[0] == "" and "decoder.layers_llm.0" in units and "decoder.x_attn_layers_cm3.1" in units


def test_consolidated_shards_validate_to_the_run_s_own_loss(runs, data, tmp_path):
    """metaseq-train validates the fully-sharded model at update 4 on its shards; metaseq-validate
    (one process, no FSDP) on jam-ckpt's consolidation of the shards it wrote then reports the
    same validation losses."""
    out, fsdp = runs.get("fsdp-jam_cross")
    on_shards = valid_stats(out)
    assert on_shards["num_updates"] == "4"
    _jam_ckpt("convert", str(fsdp / "checkpoint_4-model_part-0-shard1.pt"), "--to", "metaseq", "-o",
              str(tmp_path / "one"))
    res = run_cli("metaseq-validate", str(data), "--path", str(tmp_path / "one" / "checkpoint.pt"),
                  "--user-dir", str(Path(__file__).resolve().parent.parent / "jam_metaseq"), "--task",
                  "cm3_multimodal", "--cpu", "--num-workers", "0", "--batch-size", "4", "--tokens-per-sample", "32",
                  "--valid-subset", "valid", "--log-format", "json")
    on_one = valid_stats(res.stdout + res.stderr)
    for k in ("loss", "text_loss", "image_loss"):
        assert float(on_one[k]) == pytest.approx(float(on_shards[k]), abs=LOSS_TOL), (k, on_one[k], on_shards[k])
        assert math.isfinite(float(on_one[k]))


# ---- model parallel x fully sharded -------------------------------------------------------------------
def test_model_parallel_2_x_fsdp_2_equals_model_parallel_2(runs):
    """jam-ckpt reshards the 2-rank run's shards for MP 2 x FSDP 2: a 4-process fully-sharded run
    (another world size) starts from them and logs an MP 2 run's losses (2 processes, the same
    samples per update); its 4 files, one per (part, shard), consolidate to the MP 2 run's
    weights (measured max |difference| 6e-8)."""
    out4, four = runs.get("mp2xfsdp2")
    out2, two = runs.get("mp2")
    l4, l2 = train_losses(out4), train_losses(out2)
    assert sorted(l4) == sorted(l2) == [1, 2, 3]
    for u in l2:
        assert l4[u] == pytest.approx(l2[u], abs=LOSS_TOL), (u, l4[u], l2[u])
    assert sorted(p.name for p in four.glob("checkpoint_last*.pt")) == [
        f"checkpoint_last-model_part-{m}-shard{d}.pt" for m in range(2) for d in range(2)]
    from checkpoints_tools.readers import open_checkpoint

    reader = open_checkpoint(four / "checkpoint_last-model_part-1-shard0.pt")
    assert (reader.mp, reader.fsdp) == (2, 2)
    assert _max_diff(dict(reader.items()), _read(two / "checkpoint_last-model_part-0.pt")) <= WEIGHT_TOL


# ---- a start that does not fit: one line, before training ----------------------------------------------
def test_shards_for_another_world_size_stop_with_one_line(data, starts, tmp_path):
    """--use-sharded-state loads one shard per rank: shards written for 2 ranks given to a run on 1
    stop it before training with one line naming the jam-ckpt command that writes what it loads
    (the other misfits: ``test_hosts_fsdp.py``, in-process)."""
    script, _ = launch("jam_cross", data=data, save=tmp_path / "run", start=("--restore-file", starts["jam_cross", "f2"]),
                       gpus=1)
    res = run_script(script, workdir=tmp_path / "job", nproc=1, values=TINY, env=cli_env())
    assert res.returncode != 0 and "train_inner" not in res.stdout
    errors = [re.sub(r"^\[rank\d+\]: ", "", line) for line in res.stdout.splitlines() if "metaseq-train: error:" in line]
    assert len(errors) == 1 and "StartCheckpointError" not in res.stdout, res.stdout[-3000:]  # no traceback of ours
    f2 = str(starts["jam_cross", "f2"]).replace(".pt", "-model_part-0-shard0.pt")
    assert errors[0] == (f"metaseq-train: error: {f2}: written as 2 FSDP shard(s) per model part, but the run's "
                         f"data-parallel size is 1: write 1 with jam-ckpt reshard {f2} --mp 1 --fsdp 1 -o DIR"), errors[0]
