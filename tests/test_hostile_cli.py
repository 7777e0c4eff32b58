"""Every jam CLI on hostile input, run as the installed console scripts in real subprocesses.

What a user must see (``jam_metaseq/errors.py``): on a corrupt, foreign or missing input, exit 2 and
exactly one ``PROG: error:`` line on stderr naming the file, no traceback, no pickled code run, no
output written; on SIGTERM (SLURM's cancel / time limit) the Ctrl-C cleanup, exit 143 and no temp
output left; on an unexpected exception a traceback plus one bug-report line (exit 70).

``CASES`` holds the hostile inputs, one per CLI and sub-command that reads a file (a representative
one per CLI runs in the default suite, the rest are ``slow``: every subprocess imports torch).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from jam_metaseq.errors import EXIT_BUG, TRUST_PICKLE_HELP, describe, run_cli
from jam_metaseq.models import build_model, preset
from jam_metaseq.vocab import tiny_manifest

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1800
"""Timeout of every child process: only a guard against a hang. On a loaded machine a child that
imports torch and merges two tiny checkpoints took 80-300 s (2 busy loops beside the suite), more than
the 120 s these tests used to allow."""
BIN = Path(sys.executable).parent
VOCAB = tiny_manifest(text_size=256)


def _entry_points() -> dict[str, str]:
    """console_scripts of setup.py: name -> 'module:function'."""
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"(jam[\w-]*) = ([\w.]+:\w+)"', text))


def _script(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path}: console script not installed (pip install -e .)"
    return str(path)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return env


def cli(name: str, *args: object, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    return subprocess.run([_script(name), *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


# ---- hostile files ------------------------------------------------------------------------------------------


class Evil:
    """Unpickling this runs print("PWNED"): what a malicious checkpoint does, harmlessly."""

    def __reduce__(self):
        return (print, ("PWNED",))


def _tiny_checkpoint(path: Path, **extra) -> None:
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=VOCAB.size, max_positions=80, init_std=0.3)
    torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict(), "jam_vocab": VOCAB.to_dict(),
                **extra}, path)


def _not_utf8(path: Path, good: dict, bad: bytes) -> None:
    """Three lines: ``good``, ``bad`` (holding a Latin-1 byte: not UTF-8), ``good``."""
    line = json.dumps(good).encode()
    path.write_bytes(b"\n".join([line, bad, line]) + b"\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Valid inputs, and one corrupt, foreign or misplaced twin of each."""
    d = tmp_path_factory.mktemp("hostile")
    VOCAB.save(d / "vocab.json")
    _tiny_checkpoint(d / "ckpt.pt")
    raw = (d / "ckpt.pt").read_bytes()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save({"model": {"x": torch.zeros(2)}, "hparams": Evil()}, d / "evil.pt")
    _tiny_checkpoint(d / "foreign.pt", created=datetime.date(2024, 1, 1))  # harmless, not allow-listed
    _tiny_checkpoint(d / "legacy.pt")
    torch.save(torch.load(d / "legacy.pt", weights_only=True), d / "legacy.pt", _use_new_zipfile_serialization=False)
    with open(d / "docs.jsonl", "w") as f:
        for i, text in enumerate(["a red bicycle", "a grey cat", "three boats", "snow", "green apples"]):
            f.write(json.dumps({"id": f"d{i}", "segments": [{"text": text}]}) + "\n")
    # line 2 of each JSONL format the CLIs read holds a Latin-1 "cafe" with an acute e (byte 0xe9)
    _not_utf8(d / "bad_utf8.jsonl", {"segments": [{"text": "ok"}]}, b'{"segments": [{"text": "caf\xe9"}]}')
    _not_utf8(d / "prompts_bad_utf8.jsonl", {"prompt": "ok"}, b'{"prompt": "caf\xe9"}')
    _not_utf8(d / "mc_bad_utf8.jsonl", {"context": "a", "choices": ["b", "c"], "label": 0},
              b'{"context": "caf\xe9", "choices": ["b", "c"], "label": 0}')
    _not_utf8(d / "images_bad_utf8.jsonl", {"image": "img.png"}, b'{"image": "caf\xe9.png"}')
    (d / "mc.jsonl").write_text(json.dumps({"context": "The sky is", "choices": ["blue", "loud"], "label": 0}) + "\n")
    (d / "list.json").write_text("[1, 2, 3]\n")
    (d / "listidx.json").write_text("[1, 2, 3]\n")  # a "binarized dataset" whose index is a list
    (d / "adir").mkdir()
    (d / "afile").write_text("not a directory\n")
    (d / "bad.model").write_bytes(b"not a sentencepiece model")
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "bad.png").write_bytes(raw[:512])
    (d / "taskdir").mkdir()
    (d / "taskdir" / "piqa.jsonl").write_text('{"goal": "open a jar", "sol1": "twist"}\n')
    return d


@pytest.fixture(scope="module")
def vq(files) -> Path:
    """A tiny VQ tokenizer and its hostile twins: vq_evil (a pickled print), vq_trunc, vq_yaml."""
    from jam_metaseq.image_tokenizer import VQGAN, ImageTokenizer
    from jam_metaseq.image_tokenizer import preset as vq_preset

    torch.manual_seed(0)
    ImageTokenizer(VQGAN(vq_preset("tiny"))).save(files / "vq")
    ckpt, yml = (files / "vq" / "vqgan.ckpt").read_bytes(), (files / "vq" / "vqgan.yaml").read_text()
    for name in ("vq_evil", "vq_foreign", "vq_trunc", "vq_yaml"):
        (files / name).mkdir()
        (files / name / "vqgan.yaml").write_text(yml)
        (files / name / "vqgan.ckpt").write_bytes(ckpt)
    payload = torch.load(files / "vq" / "vqgan.ckpt", weights_only=True)
    torch.save({**payload, "hparams": Evil()}, files / "vq_evil" / "vqgan.ckpt")
    torch.save({**payload, "created": datetime.date(2024, 1, 1)}, files / "vq_foreign" / "vqgan.ckpt")
    (files / "vq_trunc" / "vqgan.ckpt").write_bytes(ckpt[: len(ckpt) // 3])
    (files / "vq_yaml" / "vqgan.yaml").write_text("model: [1, 2\n")
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 20, 20)).save(files / "img.png")
    return files


@pytest.fixture(scope="module")
def bank(files) -> Path:
    """A tiny memory bank, CLIP weights for it (plain and with a foreign global), and broken banks."""
    import shutil

    import open_clip

    from jam_metaseq.retrieval.cli import main as retrieval_main
    from jam_metaseq.retrieval.encoders import TINY_CLIP_NAME, register_tiny_clip

    register_tiny_clip()
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP_NAME)
    torch.save(clip.state_dict(), files / "clip.pt")
    torch.save({"state_dict": clip.state_dict(), "created": datetime.date(2024, 1, 1)}, files / "clip_foreign.pt")
    assert retrieval_main(["build", str(files / "docs.jsonl"), "--out", str(files / "bank"), "--vocab",
                           str(files / "vocab.json"), "--tokenizer", "bytes", "--clip-model", TINY_CLIP_NAME,
                           "--clip-checkpoint", str(files / "clip.pt")]) == 0
    for name in ("bank_list", "bank_index", "bank_vectors"):
        shutil.copytree(files / "bank", files / name)
    (files / "bank_list" / "manifest.json").write_text("[1, 2, 3]\n")
    (files / "bank_index" / "index.faiss").write_bytes(b"\x00" * 64)
    vec = (files / "bank" / "vectors.npy").read_bytes()
    (files / "bank_vectors" / "vectors.npy").write_bytes(vec[: len(vec) // 2])
    return files


# ---- the cases ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """``tool args...`` (``{F}`` = the fixture folder) must fail naming ``names`` (relative to it)."""

    id: str
    tool: str
    args: str
    names: str
    needs: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    """Outputs that must not exist afterwards."""
    default: bool = False
    """Runs in the default suite (one per CLI); the others are marked slow."""

    def argv(self, d: Path) -> list[str]:
        return [a.replace("{F}", str(d)) for a in self.args.split()]


GEN = "--tokenizer bytes --prompt hi --no-progress --max-new-tokens 2"
RET = "--vocab {F}/vocab.json --tokenizer bytes --clip-model jam-tiny-clip"
DATA = "--vocab {F}/vocab.json --tokenizer bytes"
PPL = "--data {F}/docs.jsonl --tokenizer bytes --no-progress"

CASES = [
    # jam-ckpt: every sub-command that reads a checkpoint
    Case("ckpt-inspect-evil", "jam-ckpt", "inspect {F}/evil.pt", "evil.pt", default=True),
    Case("ckpt-inspect-truncated", "jam-ckpt", "inspect {F}/trunc.pt", "trunc.pt"),
    Case("ckpt-inspect-garbage", "jam-ckpt", "inspect {F}/garbage.pt", "garbage.pt"),
    Case("ckpt-inspect-dir", "jam-ckpt", "inspect {F}/adir", "adir"),
    Case("ckpt-inspect-missing", "jam-ckpt", "inspect {F}/nope.pt", "nope.pt"),
    Case("ckpt-verify-truncated", "jam-ckpt", "verify --no-manifest {F}/trunc.pt", "trunc.pt"),
    Case("ckpt-merge-evil", "jam-ckpt", "merge {F}/evil.pt {F}/ckpt.pt -o {F}/out_m", "evil.pt", absent=("out_m",)),
    Case("ckpt-merge-vocab-list", "jam-ckpt", "merge {F}/ckpt.pt {F}/ckpt.pt --vocab {F}/list.json -o {F}/out_v",
         "list.json", absent=("out_v",)),
    Case("ckpt-widen-truncated", "jam-ckpt", "widen --llm {F}/trunc.pt --img {F}/ckpt.pt -o {F}/out_w", "trunc.pt",
         absent=("out_w",)),
    Case("ckpt-cross-garbage", "jam-ckpt", "cross --llm {F}/ckpt.pt --img {F}/garbage.pt -o {F}/out_c",
         "garbage.pt", absent=("out_c",)),
    Case("ckpt-reshard-garbage", "jam-ckpt", "reshard {F}/garbage.pt -o {F}/out_r", "garbage.pt", absent=("out_r",)),
    Case("ckpt-convert-truncated", "jam-ckpt", "convert {F}/trunc.pt --to hf -o {F}/out_h", "trunc.pt",
         absent=("out_h",)),
    # jam-generate: the model, prompts, vocabulary, image tokenizer, bank and CLIP weights it reads
    Case("generate-ckpt-evil", "jam-generate", f"--checkpoint {{F}}/evil.pt {GEN}", "evil.pt"),
    Case("generate-ckpt-truncated", "jam-generate", f"--checkpoint {{F}}/trunc.pt {GEN}", "trunc.pt"),
    Case("generate-ckpt-garbage", "jam-generate", f"--checkpoint {{F}}/garbage.pt {GEN}", "garbage.pt"),
    Case("generate-ckpt-dir", "jam-generate", f"--checkpoint {{F}}/adir {GEN}", "adir"),
    Case("generate-prompts-not-utf8", "jam-generate",
         "--checkpoint {F}/ckpt.pt --tokenizer bytes --prompts {F}/prompts_bad_utf8.jsonl --no-progress",
         "prompts_bad_utf8.jsonl:2",
         default=True),
    Case("generate-prompts-list", "jam-generate",
         "--checkpoint {F}/ckpt.pt --tokenizer bytes --prompts {F}/list.json --no-progress", "list.json:1"),
    Case("generate-vocab-list", "jam-generate", f"--checkpoint {{F}}/ckpt.pt --vocab {{F}}/list.json {GEN}",
         "list.json"),
    Case("generate-vocab-dir", "jam-generate", f"--checkpoint {{F}}/ckpt.pt --vocab {{F}}/adir {GEN}", "adir"),
    Case("generate-image-tokenizer-evil", "jam-generate",
         f"--checkpoint {{F}}/ckpt.pt {GEN} --image-tokenizer {{F}}/vq_evil --out {{F}}/out_g",
         "vq_evil/vqgan.ckpt", needs=("vq",), absent=("out_g",)),
    Case("generate-bank-manifest-list", "jam-generate", f"--checkpoint {{F}}/ckpt.pt {GEN} --retrieve {{F}}/bank_list",
         "bank_list/manifest.json", needs=("bank",)),
    Case("generate-clip-evil", "jam-generate",
         f"--checkpoint {{F}}/ckpt.pt {GEN} --retrieve {{F}}/bank --clip-checkpoint {{F}}/evil.pt", "evil.pt",
         needs=("bank",)),
    # jam-retrieval
    Case("retrieval-build-clip-evil", "jam-retrieval",
         f"build {{F}}/docs.jsonl --out {{F}}/out_b1 {RET} --clip-checkpoint {{F}}/evil.pt", "evil.pt", default=True),
    Case("retrieval-build-clip-truncated", "jam-retrieval",
         f"build {{F}}/docs.jsonl --out {{F}}/out_b2 {RET} --clip-checkpoint {{F}}/trunc.pt", "trunc.pt"),
    Case("retrieval-build-clip-wrong-model", "jam-retrieval",
         f"build {{F}}/docs.jsonl --out {{F}}/out_b3 {RET} --clip-checkpoint {{F}}/ckpt.pt", "ckpt.pt"),
    Case("retrieval-build-docs-not-utf8", "jam-retrieval",
         f"build {{F}}/bad_utf8.jsonl --out {{F}}/out_b4 {RET} --random-clip-weights", "bad_utf8.jsonl:2"),
    Case("retrieval-build-vocab-list", "jam-retrieval",
         "build {F}/docs.jsonl --out {F}/out_b5 --vocab {F}/list.json --tokenizer bytes --random-clip-weights",
         "list.json"),
    Case("retrieval-build-tokenizer-list", "jam-retrieval",
         "build {F}/docs.jsonl --out {F}/out_b6 --vocab {F}/vocab.json --tokenizer {F}/list.json "
         "--random-clip-weights", "list.json"),
    Case("retrieval-query-clip-evil", "jam-retrieval", "query {F}/bank --text hi --clip-checkpoint {F}/evil.pt",
         "evil.pt", needs=("bank",)),
    Case("retrieval-info-manifest-list", "jam-retrieval", "info {F}/bank_list", "bank_list/manifest.json",
         needs=("bank",)),
    Case("retrieval-query-index-corrupt", "jam-retrieval", "query {F}/bank_index --text hi",
         "bank_index/index.faiss", needs=("bank",)),
    Case("retrieval-neighbours-vectors-truncated", "jam-retrieval", "neighbours {F}/bank_vectors",
         "bank_vectors/vectors.npy", needs=("bank",)),
    Case("retrieval-index-not-a-bank", "jam-retrieval", "index {F}/adir", "adir/manifest.json"),
    # jam-data
    Case("data-binarize-not-utf8", "jam-data", f"binarize {{F}}/bad_utf8.jsonl {DATA} --out {{F}}/out_d1",
         "bad_utf8.jsonl:2", default=True, absent=("out_d1.json", "out_d1.tokens.bin")),
    Case("data-validate-not-utf8", "jam-data", f"validate {{F}}/bad_utf8.jsonl {DATA} --on-error fail",
         "bad_utf8.jsonl:2"),
    Case("data-validate-vocab-list", "jam-data", "validate {F}/docs.jsonl --vocab {F}/list.json --tokenizer bytes",
         "list.json"),
    Case("data-validate-vocab-binary", "jam-data", "validate {F}/docs.jsonl --vocab {F}/garbage.pt --tokenizer bytes",
         "garbage.pt"),
    Case("data-validate-vocab-dir", "jam-data", "validate {F}/docs.jsonl --vocab {F}/adir --tokenizer bytes", "adir"),
    Case("data-validate-input-dir", "jam-data", f"validate {{F}}/adir {DATA}", "adir"),
    Case("data-binarize-spm-garbage", "jam-data",
         "binarize {F}/docs.jsonl --vocab {F}/vocab.json --tokenizer {F}/bad.model --out {F}/out_d2", "bad.model"),
    Case("data-binarize-image-tokenizer-truncated", "jam-data",
         f"binarize {{F}}/docs.jsonl {DATA} --image-tokenizer {{F}}/vq_trunc --out {{F}}/out_d3",
         "vq_trunc/vqgan.ckpt", needs=("vq",)),
    Case("data-stats-index-list", "jam-data", "stats {F}/listidx", "listidx.json"),
    Case("data-stats-missing", "jam-data", "stats {F}/nope", "nope"),
    Case("data-vocab-tokenizer-list", "jam-data", "vocab --tokenizer {F}/list.json --out {F}/out_v.json",
         "list.json", absent=("out_v.json",)),
    # jam-vq
    Case("vq-encode-evil", "jam-vq", "encode {F}/img.png --tokenizer {F}/vq_evil --out {F}/out_c1.npy",
         "vq_evil/vqgan.ckpt", needs=("vq",), default=True, absent=("out_c1.npy",)),
    Case("vq-encode-truncated", "jam-vq", "encode {F}/img.png --tokenizer {F}/vq_trunc --out {F}/out_c2.npy",
         "vq_trunc/vqgan.ckpt", needs=("vq",)),
    Case("vq-encode-bad-yaml", "jam-vq", "encode {F}/img.png --tokenizer {F}/vq_yaml --out {F}/out_c3.npy",
         "vq_yaml/vqgan.yaml", needs=("vq",)),
    Case("vq-encode-bad-image", "jam-vq", "encode {F}/bad.png --tokenizer {F}/vq --out {F}/out_c4.npy", "bad.png",
         needs=("vq",)),
    Case("vq-encode-list-not-utf8", "jam-vq",
         "encode {F}/images_bad_utf8.jsonl --tokenizer {F}/vq --out {F}/out_c5.npy", "images_bad_utf8.jsonl:2",
         needs=("vq",)),
    Case("vq-decode-codes-pickle", "jam-vq", "decode --codes {F}/obj.npy --tokenizer {F}/vq --out-dir {F}/out_p",
         "obj.npy", needs=("vq",)),
    Case("vq-decode-codes-dir", "jam-vq", "decode --codes {F}/adir --tokenizer {F}/vq --out-dir {F}/out_p", "adir",
         needs=("vq",)),
    Case("vq-train-bad-image", "jam-vq", "train --out {F}/out_t --images {F}/bad.png --steps 1", "bad.png"),
    # jam-eval
    Case("eval-ppl-ckpt-evil", "jam-eval", f"ppl --checkpoint {{F}}/evil.pt {PPL}", "evil.pt"),
    Case("eval-ppl-ckpt-truncated", "jam-eval", f"ppl --checkpoint {{F}}/trunc.pt {PPL}", "trunc.pt"),
    Case("eval-ppl-data-not-utf8", "jam-eval",
         "ppl --checkpoint {F}/ckpt.pt --data {F}/bad_utf8.jsonl --tokenizer bytes --no-progress", "bad_utf8.jsonl:2"),
    Case("eval-ppl-config-list", "jam-eval", f"ppl --checkpoint {{F}}/ckpt.pt --config {{F}}/list.json {PPL}",
         "list.json", default=True),
    Case("eval-ppl-vocab-list", "jam-eval", f"ppl --checkpoint {{F}}/ckpt.pt --vocab {{F}}/list.json {PPL}",
         "list.json"),
    Case("eval-ppl-data-dir", "jam-eval", "ppl --checkpoint {F}/ckpt.pt --data {F}/adir --tokenizer bytes", "adir"),
    Case("eval-lm-eval-ckpt-evil", "jam-eval",
         "lm-eval --model-args checkpoint={F}/evil.pt,tokenizer=bytes --mc-task t={F}/mc.jsonl --tasks t",
         "evil.pt"),
    Case("eval-lm-eval-task-list", "jam-eval",
         "lm-eval --model-args checkpoint={F}/ckpt.pt,tokenizer=bytes --mc-task t={F}/list.json --tasks t",
         "list.json:1"),
    Case("eval-tasks-not-utf8", "jam-eval", "tasks --mc-task t={F}/mc_bad_utf8.jsonl --out {F}/out_tasks",
         "mc_bad_utf8.jsonl:2"),
    Case("eval-tasks-missing-fields", "jam-eval", "tasks --data-dir {F}/taskdir --out {F}/out_tasks2",
         "taskdir/piqa.jsonl:1"),
    # jam-launch, jam quickstart: an output folder that is a file
    Case("launch-save-dir-is-file", "jam-launch",
         "--stage alignment --host fairseq --data {F}/adir --save-dir {F}/afile", "afile/slurm", default=True),
    Case("quickstart-out-is-file", "jam", "quickstart --out {F}/afile --steps 1", "afile", default=True),
]


def _params():
    for c in CASES:
        yield pytest.param(c, id=c.id, marks=() if c.default else (pytest.mark.slow,))


def test_every_cli_has_hostile_cases():
    tools = {c.tool for c in CASES}
    assert tools == set(_entry_points()), tools
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES if c.default} == tools  # one of each in the default suite


@pytest.mark.parametrize("case", _params())
def test_hostile_input_is_one_line_naming_the_file(case: Case, files, request):
    for fixture in case.needs:
        request.getfixturevalue(fixture)
    r = cli(case.tool, *case.argv(files))
    err = r.stderr
    assert "Traceback" not in err, err
    assert "PWNED" not in r.stdout + err  # no pickled code ran
    assert r.returncode == 2, (r.returncode, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    prog = case.tool + (f" {case.argv(files)[0]}" if case.tool not in ("jam-generate", "jam-launch") else "")
    assert f"{prog}: error: " in lines[0], lines[0]
    assert str(files / case.names) in lines[0], lines[0]
    for out in case.absent:
        assert not (files / out).exists(), out


def test_legacy_checkpoint_loads_or_fails_in_one_line(files):
    """A pre-zip torch file (torch.save(..., _use_new_zipfile_serialization=False)): read, or refused in one
    line; never a crash."""
    r = cli("jam-generate", "--checkpoint", files / "legacy.pt", *GEN.split())
    assert r.returncode == 0 or (r.returncode == 2 and "Traceback" not in r.stderr), (r.returncode, r.stderr)


# ---- non-UTF-8 lines are lines: --on-error skip skips them --------------------------------------------------


def test_binarize_skip_counts_a_non_utf8_line(files, tmp_path):
    r = cli("jam-data", "binarize", files / "bad_utf8.jsonl", *DATA.replace("{F}", str(files)).split(),
            "--out", tmp_path / "ds", "--on-error", "skip", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["documents"] == 2 and summary["lines"] == 3 and summary["skipped"] == {"bad_encoding": 1}
    assert summary["first_errors"] == [f"{files / 'bad_utf8.jsonl'}:2: not UTF-8 (byte 0xe9 at byte 28 of the line)"]


# ---- --trust-pickle: everywhere a checkpoint is loaded, one meaning ------------------------------------------

TRUST_PICKLE_COMMANDS = [
    ("checkpoints_tools.cli", ["inspect"]), ("checkpoints_tools.cli", ["merge"]),
    ("jam_metaseq.generation.cli", []), ("jam_metaseq.eval.cli", ["ppl"]), ("jam_metaseq.eval.cli", ["lm-eval"]),
    ("jam_metaseq.retrieval.cli", ["build"]), ("jam_metaseq.retrieval.cli", ["query"]),
    ("jam_metaseq.image_tokenizer.cli", ["encode"]), ("jam_metaseq.image_tokenizer.cli", ["decode"]),
    ("jam_metaseq.data.cli", ["validate"]), ("jam_metaseq.data.cli", ["binarize"]),
]


@pytest.mark.parametrize("module, sub", TRUST_PICKLE_COMMANDS, ids=[f"{m.split('.')[-2]}-{'-'.join(s)}"
                                                                      for m, s in TRUST_PICKLE_COMMANDS])
def test_trust_pickle_flag_has_one_help(module, sub, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main([*sub, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in help_text and " ".join(TRUST_PICKLE_HELP.split()) in help_text


def test_generate_trust_pickle_reaches_the_loader(files):
    """A harmless foreign global (datetime.date): refused naming the flag; loaded with it."""
    r = cli("jam-generate", "--checkpoint", files / "foreign.pt", *GEN.split())
    assert r.returncode == 2 and "datetime.date" in r.stderr and "--trust-pickle" in r.stderr, r.stderr
    r = cli("jam-generate", "--checkpoint", files / "foreign.pt", *GEN.split(), "--trust-pickle")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["prompt"] == "hi"


@pytest.mark.slow
@pytest.mark.parametrize("tool, args, out", [
    ("jam-retrieval", f"build {{F}}/docs.jsonl --out {{F}}/out_tb {RET} --clip-checkpoint {{F}}/clip_foreign.pt",
     "out_tb/manifest.json"),
    ("jam-eval", f"ppl --checkpoint {{F}}/foreign.pt {PPL} --output {{F}}/out_te.json", "out_te.json"),
    ("jam-vq", "encode {F}/img.png --tokenizer {F}/vq_foreign --out {F}/out_tv.npy", "out_tv.npy"),
    ("jam-data", f"binarize {{F}}/docs.jsonl {DATA} --image-tokenizer {{F}}/vq_foreign --out {{F}}/out_td",
     "out_td.json"),
], ids=["retrieval-clip", "eval-ppl", "vq-encode", "data-image-tokenizer"])
def test_trust_pickle_reaches_every_loader(tool, args, out, files, vq, bank):
    argv = [a.replace("{F}", str(files)) for a in args.split()]
    r = cli(tool, *argv)
    assert r.returncode == 2 and "datetime.date" in r.stderr and "--trust-pickle" in r.stderr, r.stderr
    assert not (files / out).exists()
    r = cli(tool, *argv, "--trust-pickle")
    assert r.returncode == 0, r.stderr
    assert (files / out).exists()


# ---- SIGTERM: the Ctrl-C cleanup, exit 143 ------------------------------------------------------------------


_STOP_AT_OPEN = """
import fnmatch, importlib, os, signal, sys
entry, pattern, nth, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[-1])
module, func = entry.split(":")
sys.argv = [module, *sys.argv[4:-1]]
seen = []

def stop_at_open(event, args):
    # the nth file opened under PATTERN (the audit hook runs before it is created): say which, then
    # freeze the whole process until the test has sent SIGTERM
    if event == "open" and len(seen) < nth and isinstance(args[0], (str, os.PathLike)):
        path = os.fspath(args[0])
        if fnmatch.fnmatch(path, pattern):
            seen.append(path)
            if len(seen) == nth:
                os.write(marker, (path + "\\n").encode())
                os.kill(os.getpid(), signal.SIGSTOP)

sys.addaudithook(stop_at_open)
sys.exit(getattr(importlib.import_module(module), func)())
"""


def _sigterm_at_open(tool: str, args: list[str], *, pattern: str, nth: int = 1) -> subprocess.CompletedProcess:
    """Run ``tool``'s console-script function with ``args``; when it opens its ``nth`` file matching
    ``pattern`` it stops itself and says so through a pipe, and only then is it sent SIGTERM (delivered
    on SIGCONT). Event-driven: the signal lands at that point on a machine of any speed or load."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _STOP_AT_OPEN, _entry_points()[tool], pattern, str(nth),
                                 *args, str(w)], pass_fds=(w,), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(), cwd=ROOT)
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as marker:
            reached = marker.readline().decode().strip()
        assert reached, f"{tool} ended before opening a file matching {pattern}: {proc.communicate(timeout=HANG_GUARD_S)}"
        os.waitid(os.P_PID, proc.pid, os.WSTOPPED)  # returns once it is stopped
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _parents(d: Path, *, small: bool) -> list[Path]:
    """Two parents filled with constants, fp16: opt_125m-shaped, or (``small``) 2 layers of width 64."""
    cfg = preset("opt_125m", **({"vocab_size": 512, "layers": 2, "embed_dim": 64, "ffn_dim": 256, "heads": 4}
                                if small else {}))
    with torch.device("meta"):
        names = build_model(cfg).state_dict()
    paths = []
    for i in range(2):
        state = {k: torch.full(v.shape, 0.01 * (i + 1), dtype=torch.float16) for k, v in names.items()}
        torch.save({"model": state, "jam_config": cfg.to_dict()}, d / f"parent{i}.pt")
        paths.append(d / f"parent{i}.pt")
    return paths


@pytest.mark.parametrize("shape, stop_at", [
    ("small", "*/.merged.tmp*/*"),  # the first output file, before any tensor is written
    ("small", "*/.merged.tmp*/manifest.json*"),  # every tensor written, the commit under way
    pytest.param("opt_125m", "*/.merged.tmp*/manifest.json*", marks=pytest.mark.slow),
], ids=["small-before-writing", "small-committing", "opt_125m-committing"])
def test_sigterm_mid_merge_removes_the_temp_output(shape, stop_at, tmp_path):
    parents = _parents(tmp_path, small=shape == "small")
    out = tmp_path / "merged"
    r = _sigterm_at_open("jam-ckpt", ["merge", *map(str, parents), "-o", str(out), "--quiet"], pattern=stop_at)
    for p in parents:
        p.unlink()
    assert r.returncode == 143, r.stderr
    assert "Traceback" not in r.stderr and "jam-ckpt merge: interrupted (SIGTERM)" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a temp output or a partial OUT was left"


@pytest.mark.parametrize("nth, stop_at", [(2, "{dir}/*"), (1, "{out}.json.tmp*")],
                         ids=["tokens-file-open", "index-being-written"])
def test_sigterm_mid_binarize_removes_the_temp_files(files, tmp_path, nth, stop_at):
    src = tmp_path / "docs.jsonl"
    line = json.dumps({"segments": [{"text": "a long line of text for the byte tokenizer " * 10}]}) + "\n"
    src.write_text(line * 200)
    out = tmp_path / "out" / "ds"
    out.parent.mkdir()
    r = _sigterm_at_open("jam-data", ["binarize", str(src), "--vocab", str(files / "vocab.json"), "--tokenizer",
                                      "bytes", "--out", str(out)],
                         pattern=stop_at.format(dir=out.parent, out=out), nth=nth)
    assert r.returncode == 143, r.stderr
    assert "Traceback" not in r.stderr and "jam-data binarize: interrupted (SIGTERM)" in r.stderr, r.stderr
    assert list(out.parent.iterdir()) == [], "temp files or a partial dataset were left"


# ---- the handler itself, in process -------------------------------------------------------------------------


SIGTERM_SELF = """
import os, signal, sys, time
from jam_metaseq.errors import run_cli
cleaned = []
def long_job():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        cleaned.append(True)
before = signal.getsignal(signal.SIGTERM)
rc = run_cli("jam-test", long_job)
print(rc, cleaned, signal.getsignal(signal.SIGTERM) == before)
def ctrl_c():
    raise KeyboardInterrupt
print(run_cli("jam-test", ctrl_c))
"""


def test_sigterm_runs_the_cleanup_and_restores_the_handler():
    """In a child process (without the handler, SIGTERM would kill the test run itself)."""
    r = subprocess.run([sys.executable, "-c", SIGTERM_SELF], capture_output=True, text=True, env=_env(), timeout=HANG_GUARD_S)
    assert r.stdout.split("\n")[:2] == ["143 [True] True", "130"], (r.returncode, r.stdout, r.stderr)
    assert r.stderr.splitlines()[0].startswith("jam-test: interrupted (SIGTERM); ")
    assert r.stderr.splitlines()[1].startswith("jam-test: interrupted (SIGINT); ")


def test_describe_names_the_file_first():
    assert describe(FileNotFoundError(2, "No such file or directory", "/x/y.pt")) == "/x/y.pt: No such file or directory"
    assert describe(OSError(28, "No space left on device")) == "No space left on device"
    # one line, nothing cut: a second line (or a newline in a file name) is escaped, not dropped
    assert describe(ValueError("x.json: bad\nsecond line")) == "x.json: bad\\nsecond line"


def test_missing_optional_extra_is_advice_not_a_bug(capsys):
    def needs_faiss() -> int:
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    assert run_cli("jam-test", needs_faiss) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pip install 'jam_metaseq[retrieval]'" in err


def _boom(*args, **kwargs):
    raise TypeError("boom from the test")


def _patch(module: str, attr: str, *, item: str | None = None):
    """A patch that makes ``module.attr`` (or ``module.attr[item]``) raise ``TypeError``."""
    import importlib

    def apply(mp: pytest.MonkeyPatch) -> None:
        mod = importlib.import_module(module)
        if item is None:
            mp.setattr(mod, attr, _boom)
        else:
            mp.setitem(getattr(mod, attr), item, _boom)
    return apply


# entry point -> (argv, a bug deep inside that command)
BUGS = {
    "jam": (["demo"], _patch("jam_metaseq.cli", "demo")),
    "jam-data": (["stats", "x"], _patch("jam_metaseq.data.cli", "dataset_stats")),
    "jam-ckpt": (["inspect", "x.pt"], _patch("checkpoints_tools.load", "inspect_checkpoint")),
    "jam-generate": (["--checkpoint", "x.pt", "--prompt", "hi"], _patch("jam_metaseq.generation.cli", "generate_answers")),
    "jam-retrieval": (["info", "x"], _patch("jam_metaseq.retrieval.cli", "COMMANDS", item="info")),
    "jam-vq": (["decode", "--codes", "x.npy", "--tokenizer", "t", "--out-dir", "o"],
               _patch("jam_metaseq.image_tokenizer.cli", "cmd_decode")),
    "jam-launch": (["--stage", "alignment", "--host", "fairseq", "--data", "d", "--save-dir", "s", "--dry-run"],
                   _patch("launch.cli", "plan")),
    "jam-eval": (["tasks", "--out", "o"], _patch("jam_metaseq.eval.cli", "_run_tasks")),
}


def test_bug_cases_cover_every_entry_point():
    assert set(BUGS) == set(_entry_points())


@pytest.mark.parametrize("name", sorted(BUGS))
def test_unexpected_exception_prints_traceback_and_bug_line(name, monkeypatch, capsys):
    import importlib

    argv, patch = BUGS[name]
    patch(monkeypatch)
    module, func = _entry_points()[name].split(":")
    rc = getattr(importlib.import_module(module), func)(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_BUG, err
    assert "Traceback (most recent call last)" in err and "TypeError: boom from the test" in err
    last = err.strip().splitlines()[-1]
    prog = name + (f" {argv[0]}" if name not in ("jam-generate", "jam-launch") else "")
    assert last.startswith(f"{prog}: internal error") and "issue tracker" in last and "jam_metaseq 0.1" in last


def test_quickstart_uses_the_handler_too(monkeypatch, capsys):
    import jam_metaseq.quickstart as qs

    monkeypatch.setattr(qs, "run_quickstart", _boom)
    from jam_metaseq.cli import main

    assert main(["quickstart", "--out", "unused", "--steps", "1"]) == EXIT_BUG
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("jam quickstart: internal error")
