"""Fixtures for the host tests: a tiny mixed text + image-caption dataset and fused starting
checkpoints built from two tiny parents (``jam-ckpt`` when available, else the fusion functions)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from jam_metaseq.data.binarize import binarize
from jam_metaseq.vocab import VocabManifest, tiny_manifest

ROOT = Path(__file__).resolve().parent.parent
USER_DIR = str(ROOT / "jam_metaseq")
VOCAB = tiny_manifest()  # 112 ids: text [4, 68), image [68, 100), <break> 100, 4 sentinels, <eoss>
WORDS = ["red cube", "blue ball", "green star", "tiny cat", "big dog", "old tree"]


class CharTokenizer:
    """Lower-case letters and space -> 27 text ids (fits the tiny manifest's 64)."""

    spec = "chars"
    vocab_size = 27

    def encode(self, text: str) -> list[int]:
        return [26 if c == " " else ord(c) - ord("a") for c in text.lower() if c == " " or c.isalpha()]

    def decode(self, ids: list[int]) -> str:
        return "".join(" " if i == 26 else chr(ord("a") + i) for i in ids)


def _docs(kind: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(len(WORDS)))
        if kind == "text":
            words = [WORDS[int(rng.integers(len(WORDS)))] for _ in range(3)]
            out.append({"segments": [{"text": " and ".join(words)}]})
        else:  # caption then a 2x2 "image" whose codes are a function of the caption
            codes = [(4 * k + j) % VOCAB.image_codes for j in range(VOCAB.image_tokens_per_image)]
            out.append({"segments": [{"text": WORDS[k]}, {"image_tokens": codes}]})
    return out


def make_data(root: Path, *, n_train: int = 48, n_valid: int = 8, block_size: int = 33) -> Path:
    """DATA/{train,valid}/{text,caption} binarized with the tiny manifest; returns DATA."""
    root.mkdir(parents=True, exist_ok=True)
    VOCAB.save(root / "vocab.json")
    for split, n, seed in (("train", n_train, 0), ("valid", n_valid, 1)):
        (root / split).mkdir(exist_ok=True)
        for kind in ("text", "caption"):
            jsonl = root / f"{split}.{kind}.jsonl"
            jsonl.write_text("".join(json.dumps(d) + "\n" for d in _docs(kind, n, seed + (kind == "caption"))))
            binarize(jsonl, out_prefix=root / split / kind, vocab=VOCAB, text_tokenizer=CharTokenizer(),
                     block_size=block_size, progress=False)
    return root


def make_conversation_data(root: Path, *, base: Path, n_train: int = 24, n_valid: int = 4,
                           block_size: int = 33) -> Path:
    """An instruct data directory as ``jam run`` makes it for conversations: ``instruct`` (short
    conversations, a picture in some user turns) binarized with ``VOCAB`` plus the conversation
    tokens (``DATA/vocab.json``), beside ``base``'s caption data binarized with ``VOCAB`` alone."""
    vocab = VOCAB.with_conversation_tokens()
    root.mkdir(parents=True, exist_ok=True)
    vocab.save(root / "vocab.json")
    rng = np.random.default_rng(3)
    for split, n in (("train", n_train), ("valid", n_valid)):
        (root / split).mkdir(exist_ok=True)
        for f in (base / split).glob("caption.*"):
            os.symlink(f, root / split / f.name)
        docs = []
        for _ in range(n):
            k, j = (int(x) for x in rng.integers(len(WORDS), size=2))
            first = [{"text": "what"}] + ([{"image_tokens": [4 * k % VOCAB.image_codes] * 4}] if k % 2 else [])
            docs.append({"turns": [{"role": "user", "segments": first},
                                   {"role": "assistant", "segments": [{"text": WORDS[k].split()[0]}]},
                                   {"role": "user", "segments": [{"text": "and"}]},
                                   {"role": "assistant", "segments": [{"text": WORDS[j].split()[1]}]}]})
        jsonl = root / f"{split}.instruct.jsonl"
        jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
        binarize(jsonl, out_prefix=root / split / "instruct", vocab=vocab, text_tokenizer=CharTokenizer(),
                 block_size=block_size, progress=False)
    return root


def tiny_parent_cfg(vocab: VocabManifest = VOCAB, size: str = "tiny"):
    """A tiny parent of the preset ``size`` (``tiny``: OPT's block; ``llama_tiny``, ``gemma_tiny`` ...)."""
    from jam_metaseq.models.config import preset

    return preset(size, vocab_size=vocab.size)


def _save(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def make_parents(root: Path, vocab: VocabManifest = VOCAB, size: str = "tiny") -> tuple[Path, Path]:
    """Two tiny random parents (preset ``size``) in metaseq layout (different seeds)."""
    from jam_metaseq.models import build_model

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in (("llm", 11), ("img", 22)):
        torch.manual_seed(seed)
        cfg = tiny_parent_cfg(vocab, size)
        model = build_model(cfg)
        p = root / f"{name}.pt"
        _save({"model": model.state_dict(), "jam_config": cfg.to_dict(),
               "cfg": {"model": argparse.Namespace(_name="transformer_lm", arch="transformer_lm")}}, p)
        paths.append(p)
    return paths[0], paths[1]


def fused_checkpoint(family: str, root: Path, *, cross_every: int = 1, vocab: VocabManifest = VOCAB,
                     use_cli: bool = True) -> Path:
    """Starting weights for ``family`` from two tiny parents: ``jam-ckpt`` output when the
    checkpoint tools are installed (and ``use_cli``), else the same fusion done in-process with
    ``jam_metaseq.fusion`` (faster: for in-process tests)."""
    llm, img = make_parents(root / "parents", vocab)
    if use_cli and _has_jam_ckpt():
        return jam_ckpt_fuse(family, llm=llm, img=img, out=root / family, cross_every=cross_every, vocab=vocab)
    return _fuse_locally(family, llm=llm, img=img, out=root / f"{family}.pt", cross_every=cross_every,
                         vocab=vocab)


def _has_jam_ckpt() -> bool:
    try:
        import checkpoints_tools.cli  # noqa: F401
    except Exception:
        return False
    return True


def jam_ckpt_fuse(family: str, *, llm: Path, img: Path, out: Path, cross_every: int = 1, mp: int = 1,
                  vocab: VocabManifest = VOCAB) -> Path:
    """``jam-ckpt merge|widen|cross ... -o OUT [--mp M]`` (as ``python -m checkpoints_tools.cli``);
    returns OUT/checkpoint.pt, the name the hosts are given (at M > 1 they load its
    ``-model_part-{r}`` files). OUT's name has no ``.pt``: metaseq inserts the part suffix before
    every ``.pt`` of a path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab_path = out.parent / "vocab.json"
    vocab.save(vocab_path)
    cmd = [sys.executable, "-m", "checkpoints_tools.cli"]
    if family == "jam_uniform":
        cmd += ["merge", str(llm), str(img)]
    elif family == "jam_width":
        cmd += ["widen", "--llm", str(llm), "--img", str(img), "--init", "copy"]
    else:
        cmd += ["cross", "--llm", str(llm), "--img", str(img), "--cross-every", str(cross_every)]
    cmd += ["--vocab", str(vocab_path), "-o", str(out), "--quiet", "--mp", str(mp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"jam-ckpt failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return out / "checkpoint.pt"


def hf_parents(root: Path, case: str, vocab: VocabManifest = VOCAB) -> tuple[Path, Path]:
    """Two tiny random HF parents of the family ``case`` (``_hf_util``: ``llama``, ``gemma`` ...),
    saved with ``save_pretrained``, embeddings sized for ``vocab`` (pad id 1, the tiny manifest's)."""
    from _hf_util import hf_model

    out = []
    for name, seed in (("llm", 11), ("img", 22)):
        d = root / f"{case}_{name}"
        hf_model(case, seed=seed, vocab_size=vocab.size, pad_token_id=vocab.pad).save_pretrained(d)
        out.append(d)
    return out[0], out[1]


def llama_chameleon_parents(root: Path, vocab: VocabManifest = VOCAB) -> tuple[Path, Path]:
    """An HF Llama LLM (``_hf_util``'s ``llama`` case) and an HF Chameleon image parent of the same
    shape and settings (per-head q/k norms its only difference: issue 24's JAM-Cross across
    families), random, saved with ``save_pretrained``, embeddings sized for ``vocab``."""
    import transformers
    from _hf_util import CASES, hf_model, randomize_hf

    llm, img = root / "llama_llm", root / "chameleon_img"
    hf_model("llama", seed=11, vocab_size=vocab.size, pad_token_id=vocab.pad).save_pretrained(llm)
    config = transformers.ChameleonConfig(**{**CASES["llama"][1], "vocab_size": vocab.size, "pad_token_id": vocab.pad,
                                             "vocabulary_map": {}})
    cham = transformers.ChameleonForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    randomize_hf(cham, seed=22, plus_one=False).save_pretrained(img)
    return llm, img


# ---- running the hosts' CLIs -----------------------------------------------------------------------
def cli_env() -> dict[str, str]:
    """Environment of a host CLI subprocess: one thread, no GPU, our checkout importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(tool: str, *args: str, check: bool = True, timeout: int = 300,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``tool`` (a console script of this interpreter's environment, or ``torchrun ...``)."""
    res = subprocess.run([str(Path(sys.executable).parent / tool), *args], capture_output=True, text=True,
                         env=cli_env(), timeout=timeout, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"{tool} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def train_losses(output: str) -> dict[int, float]:
    """num_updates -> train loss from the hosts' json ``train_inner`` log lines."""
    out = {}
    for line in output.splitlines():
        if "| train_inner |" in line:
            rec = json.loads(line.split("| train_inner |", 1)[1])
            out[int(rec["num_updates"])] = float(rec["loss"])
    return out


def valid_stats(output: str) -> dict[str, str]:
    """The last json ``valid`` log line of a host's validate CLI, as logged (strings)."""
    found = [line for line in output.splitlines() if "| valid |" in line]
    if not found:
        raise AssertionError(f"no '| valid |' line in:\n{output[-3000:]}")
    return {k.removeprefix("valid_"): v for k, v in json.loads(found[-1].split("| valid |", 1)[1]).items()}


def _fuse_locally(family, *, llm, img, out, cross_every, vocab) -> Path:
    from jam_metaseq.fusion import cross_tensor, merge_tensor, state_shapes, widen_tensor
    from jam_metaseq.models.config import cross_of, uniform_of, width_of

    a = torch.load(llm, weights_only=False)["model"]
    b = torch.load(img, weights_only=False)["model"]
    parent = tiny_parent_cfg(vocab)
    if family == "jam_uniform":
        cfg = uniform_of(parent)
        state = {k: merge_tensor(k, [a[k], b[k]], weights=[0.5, 0.5]) for k in state_shapes(cfg)}
    elif family == "jam_width":
        cfg = width_of(parent)
        state = {k: widen_tensor(k, a[k], b[k], parent=parent, init="copy") for k in state_shapes(cfg)}
    else:
        cfg = cross_of(parent, cross_every, image_vocab_start=vocab.image_start, image_vocab_end=vocab.image_end)
        state = {k: cross_tensor(k, cfg=cfg, llm=a.__getitem__, img=b.__getitem__, seed=0)
                 for k in state_shapes(cfg)}
    state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    _save({"model": state, "jam_config": cfg.to_dict(),
           "cfg": {"model": argparse.Namespace(_name=family, arch=f"{family}_tiny", jam_config=cfg.to_dict())},
           "optimizer_history": [{"criterion_name": "CM3Criterion", "optimizer_name": "none",
                                  "lr_scheduler_state": {}, "num_updates": 0}],
           "extra_state": {}, "last_optimizer_state": None}, out)
    return out


# ---- registration: what importing the library does and does not do -----------------------------
def fresh_interpreter(code: str, *, pythonpath: str, cwd: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter of this environment (nothing of ours imported yet)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         env={"PYTHONWARNINGS": "ignore", "PATH": "", "PYTHONPATH": pythonpath})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


LIBRARY = ("import jam_metaseq, jam_metaseq.models, checkpoints_tools, checkpoints_tools.load, "
           "checkpoints_tools.cli, jam_metaseq.hosts.args, jam_metaseq.hosts.common, jam_metaseq.hosts.compat, "
           "jam_metaseq.task.items")


def _host_state(host: str) -> str:
    """Code defining ``state()``: what of ``host`` registration changes (registries,
    checkpoint_utils, rank-to-rank broadcast, ``sys.meta_path``, ``sys.excepthook``, torch's
    allow-list)."""
    return (
        "import sys, torch\n"
        "def state():\n"
        f"    from {host}.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY\n"
        f"    from {host}.tasks import TASK_REGISTRY\n"
        f"    from {host}.criterions import CRITERION_REGISTRY\n"
        f"    from {host} import checkpoint_utils as cu\n"
        f"    from {host}.distributed import utils as du\n"
        "    return [sorted(ARCH_MODEL_REGISTRY), sorted(MODEL_REGISTRY), sorted(TASK_REGISTRY),\n"
        "            sorted(CRITERION_REGISTRY), cu._upgrade_state_dict, cu.load_checkpoint,\n"
        "            du._broadcast_object_slow, list(sys.meta_path), sys.excepthook,\n"
        "            len(torch.serialization.get_safe_globals())]\n")


def library_leaves_host_alone(host: str) -> str:
    """Code that asserts: importing the library before the host imports no host and changes
    nothing of the host's once it is imported (registries, checkpoint_utils, rank-to-rank
    broadcast), of ``sys.meta_path``, ``sys.excepthook`` or torch's allow-list; prints UNTOUCHED."""
    return _host_state(host) + (
        "baseline = [list(sys.meta_path), sys.excepthook, len(torch.serialization.get_safe_globals())]\n"
        f"{LIBRARY}\n"
        f"assert '{host}' not in sys.modules\n"
        "assert [list(sys.meta_path), sys.excepthook, len(torch.serialization.get_safe_globals())] == baseline\n"
        f"import {host}.models, {host}.checkpoint_utils, {host}.distributed.utils\n"
        "before = state()\n"
        "assert not any(a.startswith('jam_') for a in before[0]) and 'cm3_multimodal' not in before[2]\n"
        "assert not any(getattr(f, '_jam_wrapped', False) for f in before[4:7])\n"
        "assert not any(type(f).__module__.startswith('jam_metaseq') for f in sys.meta_path)\n"
        "assert not getattr(sys.excepthook, '_jam_one_line', False)\n"
        "from jam_metaseq.hosts.compat import safe_globals\n"
        "assert not set(safe_globals()) <= set(torch.serialization.get_safe_globals())\n"
        "assert state() == before\n"
        "print('UNTOUCHED')\n")


def library_after_host_registers(host: str) -> str:
    """Code that asserts: importing the package with the host already imported (what the host's
    ``--user-dir`` import does) registers the archs, the task and the criterion and installs the
    checkpoint shims, and importing the rest of the library changes nothing more; prints REGISTERED."""
    return _host_state(host) + (
        f"import {host}.models, {host}.checkpoint_utils, {host}.distributed.utils\n"
        "import jam_metaseq\n"
        "after = state()\n"
        "assert 'jam_cross_tiny' in after[0] and 'cm3_multimodal' in after[2] and 'cm3' in after[3]\n"
        "assert getattr(after[5], '_jam_wrapped', False)\n"
        f"{LIBRARY}\n"
        "assert state() == after\n"
        "print('REGISTERED')\n")


def user_dir_registers(host: str, user_dir: str, data: str) -> str:
    """Code: ``{host}`` parses a training command line with ``--user-dir user_dir``; prints the
    arch's flags, where jam_metaseq was imported from and whether the shims are installed."""
    return (
        f"from {host} import options, checkpoint_utils\n"
        f"from {host}.models import ARCH_MODEL_REGISTRY\n"
        "p = options.get_training_parser()\n"
        f"a = options.parse_args_and_arch(p, [{data!r}, '--user-dir', {user_dir!r}, '--task', "
        "'cm3_multimodal', '--arch', 'jam_cross_tiny', '--criterion', 'cm3', '--cross-every', '0'])\n"
        "import jam_metaseq\n"
        "print('ARCH', a.arch, a.cross_every, a.decoder_embed_dim, 'jam_width_7b' in ARCH_MODEL_REGISTRY)\n"
        "print('FROM', jam_metaseq.__file__)\n"
        "print('SHIMS', getattr(checkpoint_utils.load_checkpoint, '_jam_wrapped', False))\n")


def installed_copy(tmp_path: Path) -> Path:
    """The packages as an installation lays them out (one site directory holding both)."""
    site = tmp_path / "site-packages"
    for pkg in ("jam_metaseq", "checkpoints_tools"):
        shutil.copytree(Path(USER_DIR).parent / pkg, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return site


# ---- memory --------------------------------------------------------------------------------------
class LiveBytes:
    """Bytes of CPU tensor storage alive at once while active: ``peak`` (and ``live``), counting
    every storage an operation creates (a factory, a copy, a concatenation; not a view or an
    in-place result, whose storage an input already had) until the last tensor using it is freed.
    Storages created before ``__enter__`` are not counted."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._mode = None

    def __enter__(self) -> "LiveBytes":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        def storages(tree) -> list:
            return [t.untyped_storage() for t in tree_flatten(tree)[0]
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu"]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                had = {s.data_ptr() for s in storages((args, kwargs))}
                for s in storages(out):
                    key = id(s)  # a storage's Python object lives exactly as long as its memory
                    if s.nbytes() == 0 or s.data_ptr() in had or key in tracker._sizes:
                        continue
                    tracker._sizes[key] = s.nbytes()
                    tracker.live += s.nbytes()
                    tracker.peak = max(tracker.peak, tracker.live)
                    weakref.finalize(s, tracker._free, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
