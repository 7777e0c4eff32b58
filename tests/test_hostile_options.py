"""Untrusted input, classes 4 and 5 (issue 27; threat model in docs/TESTING.md), and what a user sees
of a failure: every float option of every CLI finite and in range, every count bounded
(``jam_metaseq.inputs.numbers``); every value written into a generated sbatch script written for its
position (``jam_metaseq.inputs.scripts``), parsed back with ``bash -n`` and never executed; one-line
messages that a newline in a file name does not cut; ``jam-generate --out`` written as one set.
Classes 1-3 are in ``test_hostile_inputs.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jam_metaseq.data.documents import iter_jsonl
from jam_metaseq.errors import JamError, describe, run_cli
from jam_metaseq.inputs import check_float, finite_float
from jam_metaseq.vocab import tiny_manifest

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1800  # child timeouts guard against a hang only (a loaded machine is slow, not hung)
FAST = settings(max_examples=60, deadline=None)
VOCAB = tiny_manifest(text_size=256)

# text a hostile or unlucky user can type: separators, quotes, shell syntax, control characters
HOSTILE_CHARS = list("ab9_-./\\'\"$()`;&|<>*?~#%!{}[]=,:@+ \t\n\r\x00\x1b") + ["é", "\u2028", "\ud800"]
hostile_text = st.one_of(st.text(alphabet=st.sampled_from(HOSTILE_CHARS), max_size=24), st.text(max_size=24))


# ==== 4. numbers =================================================================================


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    from checkpoints_tools.cli import build_parser as ckpt
    from jam_metaseq.data.cli import build_parser as data
    from jam_metaseq.eval.cli import build_parser as evaluate
    from jam_metaseq.generation.cli import build_parser as generate
    from jam_metaseq.flags import add_criterion_args, add_model_args, add_task_args
    from jam_metaseq.image_tokenizer.cli import build_parser as vq
    from jam_metaseq.pipeline.run import build_parser as run
    from jam_metaseq.quickstart import build_parser as quickstart
    from jam_metaseq.retrieval.cli import build_parser as retrieval
    from jam_metaseq.generation.chat_cli import build_parser as chat
    from jam_metaseq.serve.cli import build_parser as serve
    from launch.cli import build_parser as launch

    hosts = argparse.ArgumentParser()
    for add in (add_model_args, add_task_args, add_criterion_args):
        add(hosts)
    return {"jam-ckpt": ckpt(), "jam-data": data(), "jam-eval": evaluate(), "jam-generate": generate(),
            "jam-vq": vq(), "jam-retrieval": retrieval(), "jam-launch": launch(), "jam quickstart": quickstart(),
            "jam run": run(), "jam chat": chat(), "jam serve": serve(), "fairseq/metaseq-train --user-dir jam_metaseq": hosts}


def _actions(parser: argparse.ArgumentParser, prefix: str):
    for a in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in a.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif a.option_strings:
            yield prefix, a


def test_every_float_option_of_every_cli_is_finite_and_every_thread_count_bounded():
    floats = 0
    for prog, parser in _all_parsers().items():
        for where, a in _actions(parser, prog):
            flag = f"{where} {a.option_strings[-1]}"
            assert a.type is not float, f"{flag}: type=float accepts nan and inf"
            if getattr(a.type, "__name__", "") == "finite float":
                floats += 1
                for bad in ("nan", "inf", "-inf", "1e999", "NaN"):
                    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
                        a.type(bad)
            if a.option_strings[-1] == "--threads":
                with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
                    a.type("100000")
    assert floats >= 20  # jam-generate 6 + 1, jam-ckpt --weights, jam-vq 2, jam-retrieval 4, jam-eval, hosts 5 ...


@FAST
@given(text=st.one_of(st.floats().map(repr), st.floats().map(str), st.text(max_size=6),
                      st.sampled_from(["nan", "inf", "-Infinity", "1e999", "1_0", " 2 ", "none"])),
       lo=st.none() | st.floats(-10, 10), width=st.floats(0, 10), lo_open=st.booleans(), hi_open=st.booleans(),
       none_ok=st.booleans())
def test_finite_float_accepts_exactly_the_finite_numbers_in_range(text, lo, width, lo_open, hi_open, none_ok):
    hi = None if lo is None else lo + width
    parse = finite_float(lo, hi, lo_open=lo_open, hi_open=hi_open, none_ok=none_ok)
    if none_ok and text.strip().lower() == "none":
        assert parse(text) is None
        return
    try:
        v = float(text)
    except ValueError:
        with pytest.raises(argparse.ArgumentTypeError, match="is not a number"):
            parse(text)
        return
    inside = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
        (hi is None or (v < hi if hi_open else v <= hi))
    if inside:
        assert parse(text) == v
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("tool, argv", [
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--temperature", "nan"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--repetition-penalty", "nan"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--guidance-scale", "inf"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--guidance-scale", "nan"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--image-temperature", "nan"]),
    ("jam-ckpt", ["merge", "a.pt", "b.pt", "-o", "out", "--weights", "nan", "0.5"]),
    ("jam-ckpt", ["merge", "a.pt", "b.pt", "-o", "out", "--threads", "100000"]),
    ("jam-ckpt", ["merge", "a.pt", "b.pt", "-o", "out", "--heads", "-4"]),
    ("jam-launch", ["--stage", "alignment", "--host", "fairseq", "--data", "d", "--save-dir", "s", "--port", "0"]),
])
def test_non_finite_and_out_of_range_options_are_usage_errors(capsys, tool, argv):
    """Issue 27 §4: each of these ran (all-zero ids, NaN tensors, a segfault) before."""
    from checkpoints_tools.cli import main as ckpt
    from jam_metaseq.generation.cli import main as generate
    from launch.cli import main as launch

    with pytest.raises(SystemExit) as e:
        {"jam-generate": generate, "jam-ckpt": ckpt, "jam-launch": launch}[tool](argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2] if argv[-2].startswith('-') else argv[-3]}" in err


def test_library_configs_refuse_nan_too():
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.sampling import SamplingConfig

    for kw in ({"temperature": math.nan}, {"top_p": math.nan}, {"repetition_penalty": math.inf}):
        with pytest.raises(ValueError, match="not a finite number"):
            SamplingConfig(**kw)
    with pytest.raises(ValueError, match="guidance_scale"):
        GenerationConfig(guidance_scale=math.nan)
    assert check_float(2, name="x", lo=0) == 2.0


# ==== 5. script values ===========================================================================


def _plan(**kw):
    from launch.slurm import LaunchConfig, plan

    base = dict(stage="alignment", host="fairseq", data="/d", save_dir="/s")
    (job,) = plan(LaunchConfig(**{**base, **kw}))
    return job


def _bash_syntax_ok(script: str) -> None:
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr


def _srun_words(script: str) -> list[str]:
    """The srun command as bash will split it (POSIX shlex: single quotes are literal, as in bash)."""
    return shlex.split(script[script.index("\nsrun --label ") + 1:])


def _utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH ")]


SBATCH_OK = set("abcdefghijklmnopqrstuvwxyz0123456789_-./+,=@:~é")


@settings(max_examples=120, deadline=None)
@given(field=st.sampled_from(["partition", "account", "save_dir", "data", "user_dir", "extra_args", "arch"]),
       value=hostile_text)
@example(field="partition", value="learn\ntouch /tmp/x")
@example(field="data", value="$(touch /tmp/x)`id`;rm -rf ~\n'")
def test_a_value_is_written_for_its_position_or_refused(field, value):
    """Never executed: the script is parsed back with ``bash -n`` and the value recovered intact."""
    kw = {"extra_args": ["--x", value]} if field == "extra_args" else \
        {"arch": f"jam_cross_7b{value}"} if field == "arch" else {field: value}
    directive = field in ("partition", "account", "save_dir", "arch")
    # (partition and account are written only when given: an empty one is no directive)
    refused_when = (lambda v: not v or any(c not in SBATCH_OK and not c.isalnum() for c in v)) if directive \
        else (lambda v: "\0" in v or not _utf8(v))
    written = f"jam_cross_7b{value}" if field == "arch" else value
    try:
        job = _plan(**kw)
    except JamError as e:
        flag = {"save_dir": "--save-dir", "arch": "--arch"}.get(field, f"--{field}")
        assert (flag in str(e) or "NUL" in str(e) or "UTF-8" in str(e)) and "\n" not in describe(e)
        assert refused_when(written) or (field == "arch" and "\\" in value), str(e)
        return
    if field in ("partition", "account") and not value:
        assert not any(f"--{field}" in d for d in _directives(job.script))
    else:
        assert not refused_when(written)
    _bash_syntax_ok(job.script)
    assert _srun_words(job.script) == ["srun", "--label", *job.command]
    assert len(_directives(job.script)) == 9 + sum(bool(kw.get(k)) for k in ("partition", "account"))
    if field in ("partition", "account") and value:
        assert f"#SBATCH --{field}={value}" in _directives(job.script)
    if field == "data":
        assert job.command[1] == value
    if field == "extra_args":
        assert job.command[-2:] == ["--x", value]


@pytest.mark.parametrize("flag", ["--partition", "--account", "--save-dir", "--arch"])
def test_jam_launch_refuses_a_shell_line_in_a_directive(capsys, tmp_path, flag):
    """Issue 27 §5: ``--partition $'learn\\ntouch /tmp/x'`` put a shell line into the script."""
    from launch.cli import main

    value = {"--arch": "jam_cross_7b\ntouch x"}.get(flag, "learn\ntouch x")
    argv = ["--stage", "alignment", "--host", "fairseq", "--data", "/d", "--save-dir", "/s", flag, value]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "touch x" in err.replace("\\n", " ")


def test_a_restore_file_with_shell_syntax_stays_one_word():
    value = "/w/$(touch x) `id`\n;'q'.pt"
    job = _plan(restore_file=value)
    _bash_syntax_ok(job.script)
    line = next(l for l in job.script.split("\nif ") if "START=(" in l)
    words = shlex.split("if " + line.split("\nsrun")[0])
    assert words[words.index("START=(--restore-file") + 1] == value


# ==== messages and atomic answer sets ============================================================


def test_a_newline_in_a_file_name_does_not_cut_the_message(tmp_path, capsys):
    p = tmp_path / "a\nb.jsonl"
    p.write_text('[{"text": "ok"}]\n{"oops"\n')

    def read():
        list(iter_jsonl(p, vocab=VOCAB))

    assert run_cli("jam-data validate", read) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/a\\nb.jsonl:2: bad JSON" in err, err
    assert describe(FileNotFoundError(2, "No such file or directory", "x\x1b[2Jy")) == \
        "x\\x1b[2Jy: No such file or directory"


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from PIL import Image
from jam_metaseq.generation.answer import Answer, split_segments
from jam_metaseq.generation.render import write_answer_set
from jam_metaseq.vocab import tiny_manifest

class Decoder:
    def decode_codes(self, codes):
        return [Image.new("RGB", (4, 4), (int(c[0, 0]) * 7 % 256, 0, 0)) for c in codes]

out, limit = Path(sys.argv[1]), int(sys.argv[2])
v = tiny_manifest(text_size=64)
image = [v.break_id, *(v.image_start + c for c in range(4)), v.break_id]
ids = image + [v.text_start + i % 60 for i in range(2000)] + image + [v.eos]
answers = [Answer(prompt_ids=[2], ids=ids, finish_reason="eos", seed=i, segments=split_segments(ids, vocab=v))
           for i in range(3)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    write_answer_set(answers, out_dir=out, image_decoder=Decoder())
    print("written")
except OSError as e:
    print("failed", e.errno)
"""


@pytest.mark.parametrize("exists", [False, True])
def test_jam_generate_out_is_written_as_a_set_or_not_at_all(tmp_path, exists):
    """Issue 27: a full disk left answers.jsonl/.md and 0-byte .tmp files. Here the kernel refuses
    writes past a file-size limit (EFBIG): the six PNGs fit, answers.jsonl does not."""
    out = tmp_path / "answers"
    if exists:
        out.mkdir()
        (out / "answers.jsonl").write_text("old\n")
        (out / "notes.txt").write_text("mine\n")
    before = sorted(p.name for p in out.iterdir()) if exists else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(out), "20000"], capture_output=True, text=True,
                       env=env, timeout=HANG_GUARD_S, cwd=ROOT)
    assert r.stdout.split() == ["failed", "27"], r.stdout + r.stderr[-2000:]  # EFBIG
    if exists:
        assert sorted(p.name for p in out.iterdir()) == before and (out / "answers.jsonl").read_text() == "old\n"
    else:
        assert not out.exists()
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(out), str(1 << 30)], capture_output=True, text=True,
                       env=env, timeout=HANG_GUARD_S, cwd=ROOT)
    assert r.stdout.strip() == "written", r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["answers.jsonl", "answers.md", "answers.html", "images",
                            *(["notes.txt"] if exists else [])])
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3 and len(list((out / "images").iterdir())) == 6
