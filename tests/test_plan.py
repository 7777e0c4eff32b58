"""``jam run PLAN.yaml`` (issue 16): the plan schema, its checks before any work, the training
commands (the same code as ``jam-launch``, accepted by the real fairseq parser), the budget sweep,
and plans that run end to end on a user's own JSONL files.

The end-to-end plans use tiny data and a handful of updates: they check plumbing and artefacts, not
model quality. The default suite runs a plan with given parents (random checkpoints in two layouts
jam-ckpt reads), given tokenizers, a two-budget sweep, instruction tuning on conversations (the
manifest's rows grown by extend-vocab, the fit rule, the report's history PPL), named evaluation
sets and answers; the slow test runs a plan that trains everything from the data (bpe and VQ
tokenizers, both parents, prompt/response instruct data) with every training and evaluation unit
placed through submitit's local executor (the SLURM path without a cluster), then reuses its
outputs as a second plan's given parents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from jam_metaseq import quickstart_data as qd
from jam_metaseq.cli import main as jam_main
from jam_metaseq.pipeline import spec
from jam_metaseq.pipeline.run import parse_budgets
from jam_metaseq.pipeline.spec import PlanError, load_plan, plan_yaml, quickstart_plan

pytest.importorskip("fairseq")

TPS = 96
"""Sequence length of the tiny plans (a caption document: ~40 text bytes + 66 image tokens)."""


# ---- a user's data folder -----------------------------------------------------------------------------
def _user_data(root: Path, *, n_text: int = 24, n_caption: int = 24, n_instruct: int = 8) -> dict[str, Path]:
    """Text, caption (PNG files and pre-tokenised codes) and instruction JSONL files, as a user has them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pics").mkdir(exist_ok=True)
    out = {}
    for split, seed in (("train", 0), ("valid", 1)):
        out[f"text_{split}"] = qd.write_jsonl(root / f"wiki_{split}.jsonl", qd.text_documents(n_text, seed=seed))
        docs = []
        for i, s in enumerate(qd.caption_samples(n_caption, size=32, seed=seed, follow_up=0.3)):
            if i % 4 == 3:  # some documents come pre-tokenised
                docs.append(qd.caption_document(caption=s.caption, codes=np.arange(64) % 7, follow_up=s.follow_up))
            else:
                rel = f"pics/{split}-{i}.png"
                s.image.save(root / rel)
                docs.append(qd.caption_document(caption=s.caption, image=rel, follow_up=s.follow_up))
        out[f"caption_{split}"] = qd.write_jsonl(root / f"coco_{split}.jsonl", docs)
        idocs = []
        for i, s in enumerate(qd.instruct_samples(n_instruct, size=32, seed=seed + 5)):
            rel = f"pics/instruct-{split}-{i}.png"
            s.image.save(root / rel)
            idocs.append(qd.instruct_document(s, image=rel))
        out[f"instruct_{split}"] = qd.write_jsonl(root / f"howto_{split}.jsonl", idocs)
        out[f"conv_{split}"] = qd.write_jsonl(root / f"chat_{split}.jsonl", _conversations(n_instruct, seed=seed))
    out["extra_caption"] = qd.write_jsonl(root / "extra_coco.jsonl", qd.read_jsonl(out["caption_valid"])[:6])
    return out


def _conversations(n: int, *, seed: int) -> list[dict]:
    """Short conversations (byte tokens: they fit 96); every fourth opens with a picture (64 codes)
    whose exchange the fit rule must drop for the follow-up to fit."""
    turn = lambda role, *segs: {"role": role, "segments": list(segs)}  # noqa: E731
    out = []
    for i, s in enumerate(qd.caption_samples(n, size=32, seed=seed + 9)):
        first = [{"text": f"a {s.colour} {s.shape}?"}]
        if i % 4 == 3:
            first = [{"image_tokens": [(7 * i + j) % 64 for j in range(64)]}, {"text": "what?"}]
        out.append({"turns": [turn("user", *first), turn("assistant", {"text": f"yes, {s.colour}."}),
                              turn("user", {"text": "and its shape?"}), turn("assistant", {"text": f"a {s.shape}."})]})
    return out


def _given_models(root: Path) -> dict[str, Path]:
    """A tiny image tokenizer, a manifest for byte-level text and that tokenizer, and two random
    parents of one shape: the LLM as one consolidated metaseq file, the image parent as two
    model-parallel parts."""
    from _ckpt_util import save_metaseq, tiny_parent

    from jam_metaseq.image_tokenizer import train_tiny_tokenizer
    from jam_metaseq.vocab import VocabManifest

    vq = train_tiny_tokenizer(None, out_path=root / "vq", steps=2, seed=0, progress=False, pool_size=16)
    grid = tuple(int(g) for g in vq.grid)
    vocab = VocabManifest(text_size=256, image_codes=int(vq.n_codes), num_sentinels=4,
                          image_tokens_per_image=grid[0] * grid[1], image_grid=grid, text_tokenizer="bytes")
    vocab.save(root / "vocab.json")
    out = {"vq": root / "vq", "vocab": root / "vocab.json"}
    for role, seed, mp in (("llm", 1, 1), ("img", 2, 2)):
        cfg, state = tiny_parent(seed, vocab_size=vocab.size, max_positions=128, layers=4)
        out[role] = save_metaseq(root / role, cfg, state, mp=mp)
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    return {**_user_data(root / "data"), **_given_models(root / "models"), "root": root}


def _write_plan(path: Path, plan: dict) -> Path:
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _given_plan(user: dict, **changes) -> dict:
    """Every field of a plan with given parents and tokenizers, on the user's files."""
    plan = {
        "seed": 3, "host": "fairseq", "device": "cpu", "precision": "fp32",
        "data": {
            "text": {"train": str(user["text_train"]), "valid": str(user["text_valid"])},
            "caption": {"train": [str(user["caption_train"])], "valid": str(user["caption_valid"])},
            "instruct": {"train": str(user["conv_train"]), "valid": str(user["conv_valid"]),
                         "format": "conversation", "max_images": 1},
            "vocab": str(user["vocab"]), "text_tokenizer": {"path": "bytes"},
            "image_tokenizer": {"path": str(user["vq"])}, "tokens_per_sample": TPS, "on_error": "fail"},
        "model": {"embed_dim": 32, "ffn_dim": 64, "layers": 4, "heads": 4, "activation": "relu", "bias": True,
                  "affine_ln": True},
        "parents": {"llm": str(user["llm"]), "img": {"checkpoint": str(user["img"])}},
        "variants": ["cross2_paper"],
        "pretrain": {"budget_tokens": [2 * 4 * TPS, 4 * 4 * TPS], "batch_size": 4, "lr": 1e-3,
                     "warmup_fraction": 0.25, "end_lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.01,
                     "clip_norm": 0.5, "curve_points": 2, "mixture": {"text": 1, "caption": 2}},
        "instruct": {"variants": ["cross2_paper"], "mixtures": [{"instruct": 1, "caption": 1}],
                     "budget_tokens": 2 * 4 * TPS, "batch_size": 4, "lr": 1e-4, "curve_points": 1},
        "eval": {"text": {"wiki": str(user["text_valid"])},
                 "caption": {"coco": str(user["caption_valid"]), "extra": [str(user["extra_caption"])]},
                 "batch_size": 4},
        "generate": {"prompts": ["a red circle on a white background"], "model": "auto", "guidance_scale": 2.0,
                     "temperature": 1.0, "top_p": 0.9, "max_text_tokens": 8},
        "run": {"where": "local", "jobs": 1, "threads": 1},
    }
    for dotted, value in changes.items():
        spec.apply_override(plan, f"{dotted.replace('__', '.')}={json.dumps(value)}")
    return plan


# ---- the schema ------------------------------------------------------------------------------------------
def _spec_classes() -> list[type]:
    seen, todo = [], [spec.PlanSpec]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in dataclasses.fields(cls):
            for t in typing.get_args(typing.get_type_hints(cls)[f.name]) + (typing.get_type_hints(cls)[f.name],):
                if dataclasses.is_dataclass(t):
                    todo.append(t)
    return seen


def test_every_plan_field_has_a_docstring():
    classes = _spec_classes()
    assert len(classes) >= 15
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if not spec.yaml_io._doc(c, f.name)]
    assert missing == []


def test_printed_plans_read_back_equal(tmp_path):
    for plan in (quickstart_plan(), quickstart_plan(steps=0.3, scale=2, variants=["uniform"], seed=5)):
        text = plan_yaml(plan, header="a header")
        path = tmp_path / "p.yaml"
        path.write_text(text)
        again = load_plan(path)
        spec.resolve_paths(plan, tmp_path)  # relative paths are the plan file's
        assert spec.plan_dict(again) == spec.plan_dict(plan)
        assert "# Continued pretraining" in text and text.startswith("# a header")


def test_print_quickstart_plan_is_the_quickstart(tmp_path, capsys):
    assert jam_main(["run", "--print-quickstart-plan"]) == 0
    (tmp_path / "q.yaml").write_text(capsys.readouterr().out)
    assert jam_main(["quickstart", "--print-plan"]) == 0
    (tmp_path / "q2.yaml").write_text(capsys.readouterr().out)
    a, b = load_plan(tmp_path / "q.yaml"), load_plan(tmp_path / "q2.yaml")
    assert spec.plan_dict(a) == spec.plan_dict(b)
    assert a.data.builtin is not None and a.variants == list(spec.VARIANTS) and a.budgets == [150 * 8 * 160]


def test_minimal_plan_defaults_to_the_generator(tmp_path):
    plan = load_plan(_write_plan(tmp_path / "m.yaml", {"variants": ["uniform"]}))
    assert plan.data.builtin is not None and plan.parents.llm.trained and plan.host == "fairseq"


def test_overrides_and_budgets(tmp_path):
    path = _write_plan(tmp_path / "o.yaml", {"pretrain": {"budget_tokens": 12800}})
    plan = load_plan(path, overrides=["pretrain.lr=3e-3", "run.jobs=1", "parents.img=train"])
    assert plan.pretrain.lr == 3e-3 and plan.run.jobs == 1 and plan.parents.img.trained
    assert parse_budgets("1x,4x,0.5x", reference=12800) == [12800, 51200, 6400]
    assert parse_budgets("768k, 1.5M,192000", reference=1) == [768_000, 1_500_000, 192_000]
    for bad in ("4y", "", "1.5", "0.3x"):
        with pytest.raises(ValueError, match="--budgets"):
            parse_budgets(bad, reference=1001)
    with pytest.raises(PlanError, match="--set"):
        load_plan(path, overrides=["pretrain.lr"])


# ---- bad plans: every problem named, before any work ------------------------------------------------
def _fails(tmp_path: Path, plan: dict, capsys, *extra: str) -> str:
    path = _write_plan(tmp_path / "bad.yaml", plan)
    out = tmp_path / "out"
    rc = jam_main(["run", str(path), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert not out.exists()  # nothing was run, nothing written
    assert len(err) == 1 and err[0].startswith(f"jam run: error: {path}: ") and err[0].endswith("(nothing was run)")
    return err[0]


def test_unknown_and_mistyped_fields_are_named_with_their_line(tmp_path, capsys):
    err = _fails(tmp_path, {"seed": 1, "pretrain": {"budget_tokens": 12800, "lrate": 1e-3},
                            "data": {"builtin": {"train_texts": "many"}}, "variants": ["uniform", "cross3_paper"],
                            "colour": "red"}, capsys)
    # seed (1) pretrain (2) budget_tokens (3) lrate (4) data (5) builtin (6) train_texts (7) variants (8-10)
    assert "line 4: pretrain.lrate: unknown field" in err
    assert "line 7: data.builtin.train_texts: Input should be a valid integer" in err
    assert "line 8: variants: unknown variant(s) ['cross3_paper']" in err
    assert "line 11: colour: unknown field" in err
    assert "4 problems" in err


def test_missing_files_are_named(tmp_path, user, capsys):
    plan = _given_plan(user)
    plan["data"]["text"]["train"] = [str(user["text_train"]), str(tmp_path / "nope.jsonl")]
    plan["eval"]["caption"]["extra"] = [str(tmp_path / "gone.jsonl")]
    plan["data"]["image_tokenizer"]["path"] = str(tmp_path)
    err = _fails(tmp_path, plan, capsys)
    assert f"data.text.train[1]: no such file: {tmp_path / 'nope.jsonl'}" in err
    assert f"eval.caption.extra[0]: no such file: {tmp_path / 'gone.jsonl'}" in err
    assert "data.image_tokenizer.path" in err and "vqgan.ckpt" in err


def test_a_bad_document_is_named_by_file_and_line(tmp_path, user, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"segments": [{"text": "fine"}]}\n{"segments": [{"picture": "x.png"}]}\n')
    plan = _given_plan(user)
    plan["data"]["caption"]["valid"] = str(bad)
    err = _fails(tmp_path, plan, capsys)
    assert f"data.caption.valid[0]: {bad}:2: segment 0: expected exactly one of" in err


def test_parent_shape_mismatch_is_named(tmp_path, user, capsys):
    plan = _given_plan(user, model__embed_dim=64)
    err = _fails(tmp_path, plan, capsys)
    assert "parents.llm.checkpoint: shape does not match the plan's model: embed_dim 32 (plan: 64)" in err
    assert "parents.img.checkpoint: shape does not match" in err
    # parents that differ from each other
    from _ckpt_util import save_metaseq, tiny_parent

    from jam_metaseq.vocab import VocabManifest

    cfg, state = tiny_parent(5, vocab_size=VocabManifest.load(user["vocab"]).size, max_positions=128, layers=2)
    other = save_metaseq(tmp_path / "other", cfg, state)
    plan = _given_plan(user, parents__img=str(other))
    del plan["model"]
    err = _fails(tmp_path, plan, capsys)
    assert "parents: the parents differ in shape (llm, img): layers 4 vs 2" in err


def test_parent_vocabulary_and_positions_are_checked(tmp_path, user, capsys):
    plan = _given_plan(user, data__tokens_per_sample=256, pretrain__budget_tokens=[4 * 256],
                       instruct__budget_tokens=4 * 256)
    err = _fails(tmp_path, plan, capsys)
    assert "data.tokens_per_sample: 256 exceeds the llm parent's 128 positions" in err
    from jam_metaseq.vocab import VocabManifest

    small = VocabManifest(text_size=128, image_codes=64, num_sentinels=4, image_tokens_per_image=64, image_grid=(8, 8))
    small.save(tmp_path / "small.json")
    err = _fails(tmp_path, _given_plan(user, data__vocab=str(tmp_path / "small.json")), capsys)
    assert f"data.vocab: vocab manifest has {small.size} ids but the llm parent's embedding has" in err
    err = _fails(tmp_path, _given_plan(user, data__image_tokenizer__path=None), capsys)
    assert "data.image_tokenizer.path: a given parent needs the image tokenizer it was trained with" in err


def test_budgets_that_do_not_divide_into_updates_are_named(tmp_path, user, capsys):
    plan = _given_plan(user, pretrain__budget_tokens=[4 * TPS * 2, 1000], instruct__budget_tokens=4 * TPS + 1)
    err = _fails(tmp_path, plan, capsys)
    assert ("pretrain.budget_tokens[1]: 1,000 tokens is not a whole number of updates of 4 x 96 = 384 tokens "
            "(batch_size x data.tokens_per_sample); nearest: 768 or 1,152") in err
    assert "instruct.budget_tokens: 385 tokens" in err
    # the same through --budgets (multiples of the plan's first budget, 768 tokens)
    err = _fails(tmp_path, _given_plan(user), capsys, "--budgets", "1x,1000")
    assert "pretrain.budget_tokens[1]: 1,000 tokens is not a whole number of updates" in err


def test_host_and_placement_rules(tmp_path, user, capsys):
    err = _fails(tmp_path, _given_plan(user, host="metaseq"), capsys)
    assert "host: metaseq cannot train on a CPU" in err
    err = _fails(tmp_path, _given_plan(user, precision="bf16"), capsys)
    assert "precision bf16 needs a GPU device" in err
    err = _fails(tmp_path, _given_plan(user, device="cuda", run__where="slurm", run__slurm__gpus=3), capsys)
    assert "pretrain.batch_size: 4 sequences do not divide over run.slurm.gpus = 3" in err


def test_images_as_codes_need_no_image_tokenizer_and_dry_run_refuses_what_the_run_would(tmp_path, user, capsys):
    """Issue 27: caption data whose images are already VQ codes (``image_tokens``) with a given
    vocabulary manifest trains without an image tokenizer (none to train, none to encode with);
    without the manifest the codes belong to, ``--dry-run`` refuses it as the run would."""
    from jam_metaseq.vocab import VocabManifest

    grid = VocabManifest.load(user["vocab"]).image_tokens_per_image
    docs = [qd.caption_document(caption=f"a shape number {i}", codes=np.arange(grid) % 7) for i in range(8)]
    codes = qd.write_jsonl(tmp_path / "codes.jsonl", docs)
    plan = _given_plan(user, data__caption__train=[str(codes)], data__caption__valid=str(codes),
                       data__image_tokenizer__path=None, data__instruct=None,
                       eval__caption={"codes": str(codes)}, generate__prompts=[])
    no_vocab = _given_plan(user, data__caption__train=[str(codes)], data__caption__valid=str(codes),
                           data__image_tokenizer__path=None, data__vocab=None, data__instruct=None,
                           eval__caption={"codes": str(codes)}, generate__prompts=[])
    err = _fails(tmp_path, no_vocab, capsys, "--dry-run")
    assert "data.image_tokenizer.path" in err and "give data.vocab" in err, err
    path = _write_plan(tmp_path / "codes.yaml", plan)
    out = tmp_path / "run"
    rc = jam_main(["run", str(path), "--out", str(out), "--no-progress", "--stages", "data,tokenizers,binarize"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "no image tokenizer" in captured.err
    assert not (out / "tokenizers" / "vq").exists()
    assert VocabManifest.load(out / "tokenizers" / "vocab.json").image_codes == VocabManifest.load(user["vocab"]).image_codes
    assert list(out.rglob("*.tokens.bin")) or list(out.rglob("*.bin"))


# ---- training commands -------------------------------------------------------------------------------
def _dry(tmp_path: Path, plan: dict, capsys) -> str:
    path = _write_plan(tmp_path / "dry.yaml", plan)
    assert jam_main(["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0, capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().out


def test_dry_run_lists_units_and_commands(tmp_path, user, capsys):
    out = _dry(tmp_path, _given_plan(user), capsys)
    units = [line.split()[0] for line in out.splitlines()[1:] if not line.startswith(" ")]
    assert units == ["data", "tokenizers", "bin", "parents/llm", "parents/img", "fused/cross2_paper",
                     "pretrain/768/cross2_paper", "pretrain/1536/cross2_paper", "instruct/cross2_paper/start",
                     "instruct/cross2_paper/instruct+caption", "eval/parent_llm", "eval/parent_img",
                     "eval/start/cross2_paper", "eval/768/cross2_paper", "eval/1536/cross2_paper",
                     "eval/instruct/cross2_paper/instruct+caption", "eval/conversations/cross2_paper/instruct+caption",
                     "report", "generate"]
    cmds = [shlex.split(line) for line in out.splitlines() if line.startswith("    ")]
    assert len(cmds) == 3  # two budgets + one instruct run; given parents are not trained
    first = cmds[0]
    assert first[0] == "fairseq-train" and first[first.index("--max-update") + 1] == "2"
    assert first[first.index("--mixture") + 1] == "text=1,caption=2" and "--cpu" in first
    assert cmds[2][cmds[2].index("--mixture") + 1] == "instruct=1,caption=1" and "--instruction" in cmds[2]


def _fairseq_args(cmd: list[str]):
    """The real fairseq-train parser on a command line (fails on any flag fairseq does not know)."""
    from fairseq import options

    from jam_metaseq.hosts import register_hosts

    register_hosts(import_hosts=True)  # what --user-dir does in fairseq-train

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, input_args=cmd[1:])


def test_fairseq_accepts_every_flag_of_the_plan_commands(tmp_path, user, capsys):
    out = _dry(tmp_path, _given_plan(user), capsys)
    cmds = [shlex.split(line) for line in out.splitlines() if line.startswith("    ")]
    for cmd in cmds:
        args = _fairseq_args(cmd)
        assert args.ddp_backend == "legacy_ddp" and args.keep_interval_updates == 2
        assert args.distributed_port == -1 and args.cpu
    pre = _fairseq_args(cmds[0])
    # the plan's settings are the recipe's (each flag once: tests/test_launch.py)
    assert pre.adam_betas == "(0.9, 0.95)" and pre.clip_norm == 0.5
    assert _fairseq_args(cmds[2]).adam_betas == "(0.9, 0.98)"
    assert pre.weight_decay == 0.01 and pre.end_learning_rate == 1e-5 and pre.warmup_updates == 1
    assert pre.lr == [1e-3] and pre.batch_size == 4 and pre.max_tokens == 4 * TPS and pre.cross_every == 2


def test_metaseq_commands_come_from_the_launcher(tmp_path, user, capsys):
    from launch.recipes import StageRecipe
    from launch.slurm import LaunchConfig, train_command

    from jam_metaseq.pipeline.train import host_command

    plan = _given_plan(user, host="metaseq", device="cuda", precision="bf16", run__where="slurm",
                       run__slurm__gpus=2, run__slurm__partition="learn", pretrain__batch_size=4)
    out = _dry(tmp_path, plan, capsys)
    cmds = [shlex.split(line) for line in out.splitlines() if line.startswith("    ")]
    cmd = cmds[0]
    assert cmd[0] == "metaseq-train" and "--use-sharded-state" in cmd and "--keep-last-updates" in cmd
    assert cmd[cmd.index("--model-parallel-size") + 1] == "1" and "--bf16" in cmd and "--fp16" in cmd
    assert cmd[cmd.index("--ddp-backend") + 1] == "fully_sharded" and "--cpu" not in cmd
    assert cmd[cmd.index("--distributed-world-size") + 1] == "2" and cmd[cmd.index("--max-tokens") + 1] == str(2 * TPS)
    # exactly jam-launch's command for the same recipe, then the plan's own flags, none of them twice
    p = load_plan(tmp_path / "dry.yaml")
    from jam_metaseq.pipeline.run import RunOptions, run_plan

    res = run_plan(p, RunOptions(out=tmp_path / "o2", dry_run=True, progress=False))
    job = res["jobs"]["pretrain/768/cross2_paper"]
    ours = host_command(job, plan=p, gpus=2, slurm=p.run.slurm)
    base = train_command(LaunchConfig(stage="plan", host="metaseq", data=str(job.data), save_dir=str(job.save_dir),
                                      arch=job.arch, restore_file=str(job.restore), gpus=2, tokens_per_sample=TPS,
                                      max_tokens=2 * TPS, precision="bf16", seed=job.seed, port=29500,
                                      user_dir=ours[ours.index("--user-dir") + 1]),
                         StageRecipe(name="plan", description="", lr=1e-3, warmup_updates=1, batch_tokens=4 * TPS,
                                     gpus=2, max_update=2, save_interval_updates=1, adam_betas=tuple(p.pretrain.betas),
                                     weight_decay=p.pretrain.weight_decay, clip_norm=p.pretrain.clip_norm,
                                     end_lr=p.pretrain.end_lr, log_interval=1))
    assert ours[:len(base)] == base
    assert not {w for w in ours[len(base):] if w.startswith("--")} & {w for w in base if w.startswith("--")}


def _flags_of(cmd: list[str]) -> list[str]:
    return [w for w in cmd if w.startswith("--")]


@pytest.mark.parametrize("host,where", [("fairseq", "local"), ("metaseq", "slurm")])
def test_every_dry_run_command_has_each_flag_once(tmp_path, user, capsys, host, where):
    """What `jam run --dry-run` prints can be read as it is: no flag twice in any training command
    (the plan's settings are merged into the launcher's recipe, not appended to it)."""
    plan = _given_plan(user, host=host, **({"device": "cuda", "run__where": "slurm", "run__slurm__gpus": 2}
                                           if where == "slurm" else {}))
    plan["parents"] = {"llm": {}, "img": {}, "train": {"budget_tokens": 2 * 8 * TPS}}  # parents trained too
    cmds = [shlex.split(line) for line in _dry(tmp_path, plan, capsys).splitlines() if line.startswith("    ")]
    assert len(cmds) == 5  # two parents, two budgets, one instruct run
    for cmd in cmds:
        flags = _flags_of(cmd)
        assert len(flags) == len(set(flags)), sorted({f for f in flags if flags.count(f) > 1})


# ---- the report -------------------------------------------------------------------------------------------
def _fake_eval(i: int) -> dict:
    return {"params": 1000 * (i + 1), "sets": {"text": {"valid": {"ppl": 10.0 + i, "text_ppl": 10.0 + i,
                                                                   "image_ppl": float("nan"), "tokens": 5}},
                                                "caption": {"valid": {"ppl": 20.0 - i, "text_ppl": 9.0,
                                                                      "image_ppl": 5.0, "tokens": 5}}}}


def test_sweep_results_and_plot(tmp_path):
    from jam_metaseq.pipeline import report as rp
    from jam_metaseq.pipeline.layout import budget_tag

    plan = quickstart_plan(variants=["uniform", "cross2_paper"])
    plan.pretrain.budget_tokens = [12800, 51200, 204800]
    evals = {"parent_llm": _fake_eval(0), "parent_img": _fake_eval(1)}
    curve = {"curve": [{"update": 1, "text_ppl": 3.0, "image_ppl": 4.0}], "updates": 1, "token_budget": 8}
    pretrain = {}
    for j, b in enumerate(plan.budgets):
        for k, key in enumerate(plan.variants):
            evals[f"{budget_tag(b)}/{key}"] = _fake_eval(2 + 3 * k + j)
            pretrain.setdefault(b, {})[key] = curve
    for key in plan.variants:
        evals[f"start/{key}"] = _fake_eval(9)
    tokens = {b: {"text": 6400, "caption": 12800 * (1 + j)} for j, b in enumerate(plan.budgets)}  # growing captions
    res = rp.build_results(plan=plan, evals=evals, parents={"llm": curve, "img": curve}, pretrain=pretrain,
                           data_tokens=tokens)
    s = res["sweep"]
    # a 50/50 mixture: each source gets half of the budget
    assert s["epochs"] == {"text": [1.0, 4.0, 16.0], "caption": [0.5, 1.0, 2.667]}
    assert s["budgets"] == [12800, 51200, 204800]
    assert s["variants"]["cross2_paper"]["text_ppl"] == [15.0, 16.0, 17.0]
    assert s["variants"]["uniform"]["caption_ppl"] == [18.0, 17.0, 16.0]
    assert s["parents"]["parent_img"]["caption_ppl"] == 19.0
    assert [r["key"] for r in res["rows"]] == ["parent_llm", "parent_img", "uniform", "cross2_paper"]
    assert res["rows"][2]["text_ppl"] == 14.0  # the rows are the largest budget's
    assert "Budget sweep" in rp.render_tables(res) and "205k caption" not in rp.render_tables(res)
    rp.plot_sweep(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(res)


# ---- end to end ------------------------------------------------------------------------------------------
def _check_run(out: Path, plan: spec.PlanSpec, stdout: str) -> dict:
    res = json.loads((out / "report" / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == ["parent_llm", "parent_img", *plan.variants]
    for r in res["rows"]:
        for k in ("text_ppl", "caption_ppl"):
            assert math.isfinite(r[k]) and r[k] > 1, r
        names = {kind: set(r["sets"][kind]) for kind in ("text", "caption")}
        assert names == {kind: set(getattr(plan.eval, kind) or {"valid": 0}) for kind in ("text", "caption")}
        if r["role"] == "jam":
            assert r["curve"] and r["token_budget"] == plan.budgets[-1]
    sweep = res["sweep"]
    assert sweep["budgets"] == plan.budgets and all(e > 0 for eps in sweep["epochs"].values() for e in eps)
    assert all(len(v["text_ppl"]) == len(plan.budgets) for v in sweep["variants"].values())
    if len(plan.budgets) > 1:
        assert (out / "report" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "Budget sweep" in stdout
    if plan.data.has_instruct:
        assert len(res["instruct"]) == len(plan.instruct.variants) * len(plan.instruct.mixtures)
        assert "Table 5" in stdout
    html = (out / "generate" / "answers.html").read_text()
    assert html.count("<img") >= 1
    return res


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in out.rglob("*") if p.is_file()}


def test_given_parents_plan_end_to_end_and_resume(tmp_path, user, capsys):
    path = _write_plan(tmp_path / "plan.yaml", _given_plan(user))
    out = tmp_path / "run"
    rc = jam_main(["run", str(path), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    plan = load_plan(path)
    res = _check_run(out, plan, captured.out)
    # given parents are read in place: nothing copied, their size reported
    assert not list((out / "parents").rglob("*.pt"))
    assert res["rows"][0]["given"] and res["rows"][0]["params"] == res["rows"][1]["params"]
    # the image parent came as two model-parallel parts
    assert len(list(Path(user["img"]).parent.glob("checkpoint_last-model_part-*.pt"))) == 2
    # conversations: the run's manifest (data.vocab) lacks their tokens, so the pretrained model got
    # their rows (extend-vocab) and the instruct run trained with them
    from jam_metaseq.data.binarize import open_dataset
    from jam_metaseq.vocab import VocabManifest

    base = VocabManifest.load(user["vocab"])
    tuned = VocabManifest.load(out / "instruct" / "cross2_paper" / "instruct+caption" / "vocab.json")
    assert tuned == base.with_conversation_tokens() != base
    start = json.loads((out / "instruct" / "cross2_paper" / "start" / "ckpt" / "manifest.json").read_text())
    assert start["operation"] == "extend-vocab" and start["vocab_rows"]["rows"] == [base.num_used, tuned.size]
    # the fit rule dropped the picture exchange of every fourth conversation and kept its follow-up
    ds = open_dataset(out / "bin" / "instruct" / "train" / "instruct")
    users = [int((ds.document(j)["tokens"] == tuned.user_id).sum()) for j in range(ds.num_documents)]
    assert users == [1 if i % 4 == 3 else 2 for i in range(8)]
    conv = res["instruct"][0]["conversations"]
    assert conv["history_ppl"]["exchanges"] == 6 and conv["history_ppl"]["tokens"] > 0
    assert "prompt_following" not in conv  # the user's files: no known pictures to score
    assert "Conversations:" in captured.out and "jam chat " in captured.out and "jam serve " in captured.out
    before = _mtimes(out)
    assert jam_main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out == captured.out and _mtimes(out) == before  # all skipped
    # one more budget below the largest: only its units and the report run
    assert jam_main(["run", str(path), "--out", str(out), "--no-progress", "--budgets", "0.5x,1x,2x"]) == 0
    err = capsys.readouterr().err
    ran = [line.split()[-1] for line in err.splitlines() if "] run  " in line]
    assert ran == ["pretrain/384/cross2_paper", "eval/384/cross2_paper", "report"], ran
    res = json.loads((out / "report" / "results.json").read_text())
    assert res["sweep"]["budgets"] == [384, 768, 1536]


@pytest.mark.slow
def test_trained_plan_through_submitit_then_reused_as_given(tmp_path, user, capsys):
    pytest.importorskip("submitit")
    plan = _given_plan(user)
    plan["data"].update({"vocab": None, "text_tokenizer": {"vocab_size": 200, "kind": "bpe", "sample_lines": 500},
                         "image_tokenizer": {"steps": 4, "max_images": 20}, "num_sentinels": 3})
    plan["parents"] = {"llm": "train", "img": "train",
                       "train": {"budget_tokens": 6 * 4 * TPS, "batch_size": 4, "lr": 3e-3, "curve_points": 2}}
    plan["model"] = {"embed_dim": 32, "ffn_dim": 64, "layers": 4, "heads": 2}
    plan["variants"] = ["uniform", "cross2_preserve"]
    plan["instruct"]["variants"] = ["cross2_preserve"]
    plan["instruct"]["mixtures"] = [{"instruct": 1}]
    plan["data"]["instruct"].update(train=str(user["instruct_train"]), valid=str(user["instruct_valid"]),
                                    format="plain")  # prompt/response documents: no conversation tokens
    plan["generate"]["prompts"] = ["red circle"]  # the answer's image must fit the parents' 96 positions
    plan["run"] = {"where": "slurm", "jobs": 2, "slurm": {"cluster": "local", "gpus": 0, "time_hours": 1}}
    path = _write_plan(tmp_path / "trained.yaml", plan)
    out = tmp_path / "trained"
    rc = jam_main(["run", str(path), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    trained = load_plan(path)
    _check_run(out, trained, captured.out)
    assert (out / "tokenizers" / "bpe.json").is_file() and (out / "tokenizers" / "vq" / "vqgan.ckpt").is_file()
    assert len(list((out / "slurm").glob("*_submitted.pkl"))) >= 10  # training and eval went through submitit
    # the trained parents, tokenizers and manifest as a new plan's given ones (vocab from the parents)
    again = _given_plan(user, parents__llm=str(out / "parents/llm/checkpoint_last.pt"),
                        parents__img=str(out / "parents/img"), data__vocab=None,
                        data__text_tokenizer__path=str(out / "tokenizers" / "bpe.json"),
                        data__image_tokenizer__path=str(out / "tokenizers" / "vq"),
                        model__heads=2, variants=["width_average"], instruct__variants=["width_average"],
                        generate__prompts=["red circle"])
    path2 = _write_plan(tmp_path / "again.yaml", again)
    rc = jam_main(["run", str(path2), "--out", str(tmp_path / "again"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    res = _check_run(tmp_path / "again", load_plan(path2), captured.out)
    first = json.loads((out / "report" / "results.json").read_text())
    for i in (0, 1):  # the same parents evaluate to the same perplexity
        assert res["rows"][i]["text_ppl"] == pytest.approx(first["rows"][i]["text_ppl"], rel=1e-5)


# ---- JAM-Cross between parents of different sizes (issue 17) --------------------------------------------
def test_parents_of_different_sizes_cross_with_the_image_branch_flags(tmp_path, user, capsys):
    """Given parents of two sizes: with ``image_model`` the plan checks each against its own shape
    and trains JAM-Cross with the image branch's flags (accepted by the real fairseq parser);
    variants that need one shape are refused."""
    from _ckpt_util import save_metaseq, tiny_parent

    from jam_metaseq.vocab import VocabManifest

    cfg, state = tiny_parent(6, vocab_size=VocabManifest.load(user["vocab"]).size, max_positions=128,
                             embed_dim=16, ffn_dim=48, heads=2, layers=3)
    small = save_metaseq(tmp_path / "small_img", cfg, state)
    image_model = {"embed_dim": 16, "ffn_dim": 48, "layers": 3, "heads": 2}
    plan = _given_plan(user, parents__img=str(small), image_model=image_model)
    out = _dry(tmp_path, plan, capsys)
    cmds = [shlex.split(line) for line in out.splitlines() if line.startswith("    ")]
    args = _fairseq_args(cmds[0])
    assert (args.img_embed_dim, args.img_ffn_embed_dim, args.img_layers, args.img_attention_heads) == (16, 48, 3, 2)
    assert (args.decoder_embed_dim, args.decoder_layers, args.cross_every) == (32, 4, 2)
    # without image_model the parents of two sizes are refused, as before
    err = _fails(tmp_path, _given_plan(user, parents__img=str(small)), capsys)
    assert "the parents differ in shape (llm, img): embed_dim 32 vs 16" in err and "give model and image_model" in err
    # image_model checked against the given image parent
    err = _fails(tmp_path, _given_plan(user, parents__img=str(small), image_model={**image_model, "layers": 2}), capsys)
    assert "parents.img.checkpoint: shape does not match the plan's image_model: layers 3 (plan: 2)" in err
    # one-shape variants are refused
    err = _fails(tmp_path, _given_plan(user, parents__img=str(small), image_model=image_model,
                                       variants=["cross2_paper", "uniform"], instruct__variants=["cross2_paper"]),
                 capsys)
    assert "variants ['uniform'] need parents of one shape" in err
