"""What lets fairseq and metaseq load, broadcast and start from JAM checkpoints: compatibility
shims installed when a host registers the JAM models (``hosts.common.register_with_host``), never
on import.

- ``allow_checkpoint_globals``: the non-tensor globals host checkpoints hold, allow-listed for
  torch's ``weights_only`` loading (torch >= 2.6), process-wide.
- ``patch_host_upgrader``: a fresh ``jam-ckpt`` file gets the neutral ``optimizer_history`` and
  ``extra_state`` entries the hosts' checkpoint upgraders index into.
- ``patch_host_broadcast``: the hosts' rank-to-rank object broadcast unpickles on torch >= 2.6.
- ``patch_host_load_checkpoint`` -> ``check_trainer_start``: before the first update, the files a
  trainer starts from (the set of ``-model_part-r``) are opened by the checkpoint loader
  (``checkpoints_tools.load_model`` on the meta device) and checked against the model and
  vocabulary, on every rank.
- ``install_one_line_errors``: such errors (and ``DataSetupError``) end a host CLI with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jam_metaseq.task.items import DataSetupError
from jam_metaseq.vocab import VocabManifest


def safe_globals() -> list[Any]:
    """Non-tensor globals fairseq/metaseq checkpoints hold, for ``weights_only`` loading (torch >= 2.6)."""
    out: list[Any] = [argparse.Namespace, np.dtype, np.ndarray]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["scalar"])
        except ImportError:
            continue
        for name in ("scalar", "_reconstruct"):
            if hasattr(mod, name):
                out.append(getattr(mod, name))
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def allow_checkpoint_globals() -> None:
    """Allow-list ``safe_globals()`` process-wide (idempotent), so hosts' own ``torch.load`` works."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(safe_globals())


def normalise_start_state(state: Any) -> Any:
    """Give a freshly written starting checkpoint (``jam-ckpt``: ``optimizer_history == []``,
    ``extra_state is None``) the neutral entries the hosts' checkpoint upgraders index into."""
    if isinstance(state, dict) and "model" in state:
        if not state.get("optimizer_history"):
            from checkpoints_tools.writers import start_optimizer_history

            state["optimizer_history"] = start_optimizer_history()
        if state.get("extra_state") is None:
            state["extra_state"] = {}
    return state


def patch_host_upgrader(module: Any) -> None:
    """Wrap ``module._upgrade_state_dict`` (fairseq/metaseq ``checkpoint_utils``) once with
    ``normalise_start_state``."""
    orig = getattr(module, "_upgrade_state_dict", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return

    def upgrade(state: Any) -> Any:
        return orig(normalise_start_state(state))

    upgrade._jam_wrapped = True  # type: ignore[attr-defined]
    module._upgrade_state_dict = upgrade


def patch_host_broadcast(module: Any) -> None:
    """Let ``module._broadcast_object_slow`` (fairseq/metaseq ``distributed.utils``) unpickle on
    torch >= 2.6. It carries objects rank 0 built itself (e.g. a checkpoint it read through the
    allow-listed ``weights_only`` load, plus the host's OmegaConf config) to the other ranks of the
    same job, so the receiving side may load it unrestricted; checkpoint files never go through it."""
    orig = getattr(module, "_broadcast_object_slow", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return
    import io

    def broadcast_object_slow(obj: Any, src_rank: int, group: object, dist_device: torch.device) -> Any:
        if module.get_rank(group) == src_rank:
            return orig(obj, src_rank, group, dist_device)
        length = torch.LongTensor([0]).to(dist_device)
        module.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        module.broadcast(buffer, src=src_rank, group=group)
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    broadcast_object_slow._jam_wrapped = True  # type: ignore[attr-defined]
    module._broadcast_object_slow = broadcast_object_slow


def patch_host_load_checkpoint(module: Any) -> None:
    """Wrap ``module.load_checkpoint(cfg, trainer, ...)`` (fairseq/metaseq ``checkpoint_utils``,
    which their training CLIs call once, after building the model and before the first update)
    once with ``check_trainer_start``: a starting checkpoint that is missing, unreadable or does
    not fit the JAM model stops every rank with one line before the host loads it."""
    orig = getattr(module, "load_checkpoint", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return

    def load_checkpoint(cfg: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        check_trainer_start(cfg, trainer)
        return orig(cfg, trainer, *args, **kwargs)

    load_checkpoint._jam_wrapped = True  # type: ignore[attr-defined]
    module.load_checkpoint = load_checkpoint


def check_trainer_start(cfg: Any, trainer: Any) -> None:
    """``check_start_checkpoint`` for the file this rank's trainer is about to load (its
    ``-model_part-{r}`` at model-parallel size > 1; FSDP shards, flat, are not checked), then
    agreed on by all ranks, so that no rank waits for one that stopped."""
    model, task = trainer.get_model(), trainer.task
    vocab = getattr(task, "vocab", None)
    suffix = trainer.checkpoint_suffix or ""
    if not hasattr(model, "jam_config") or not isinstance(vocab, VocabManifest) or "-shard" in suffix:
        return
    mp = getattr(model, "model_parallel_size", 1)
    error: StartCheckpointError | None = None
    path = start_checkpoint(restore_file=getattr(cfg, "restore_file", None),
                            finetune_from_model=getattr(cfg, "finetune_from_model", None),
                            save_dir=getattr(cfg, "save_dir", "checkpoints"), suffix=suffix)
    if path is not None:
        whole = path.replace(f"{suffix}.pt", ".pt") if suffix else path
        try:
            if mp > 1 and not Path(path).exists() and Path(whole).is_file():
                raise StartCheckpointError(
                    f"{path}: not found; {whole} is one consolidated file and --model-parallel-size {mp} "
                    f"loads one -model_part-{{r}} file per rank: write them with jam-ckpt reshard {whole} "
                    f"--mp {mp} -o DIR")
            check_start_checkpoint(path, config=model.jam_config, vocab=vocab, model_parallel_size=mp)
        except StartCheckpointError as e:
            error = e
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        failed = torch.tensor([0.0 if error is None else 1.0], device=getattr(trainer, "device", "cpu"))
        dist.all_reduce(failed)
        if error is None and failed.item() > 0:
            error = StartCheckpointError(f"{int(failed.item())} other rank(s) cannot use their starting checkpoint "
                                         f"(their error is above)")
    if error is not None:
        raise error


class StartCheckpointError(ValueError):
    """A starting checkpoint the run cannot use; raised while the model is built, before training.
    The host CLIs print it as one line (``install_one_line_errors``)."""


def _unsafe_hint(msg: str, path: str | Path) -> str:
    """jam-ckpt's message for a refused global, with the way out a host run has (no --trust-pickle)."""
    head = msg.split("; pass --trust-pickle", 1)[0]
    return (f"{head}; if you trust this file, rewrite it without them: "
            f"jam-ckpt convert {path} --to metaseq -o DIR --trust-pickle")


def check_start_checkpoint(path: str | Path, *, config: Any, vocab: VocabManifest,
                           model_parallel_size: int = 1) -> None:
    """Stop before training when the starting weights cannot fit this model (``config``) and
    vocabulary: the checkpoint loader (``checkpoints_tools.load_model`` on the meta device: every
    name and shape checked, no tensor data read; pickles through ``safe_load``'s allow-list) over
    the whole set of files the ranks load (``path`` is this rank's ``-model_part-{r}`` at
    model-parallel size > 1), which must be split for ``model_parallel_size``. Errors become
    ``StartCheckpointError`` with jam-ckpt's one-line message."""
    from checkpoints_tools.load import load_model
    from checkpoints_tools.readers import open_checkpoint
    from checkpoints_tools.safe_load import CheckpointError, UnsafePickleError

    allow_checkpoint_globals()
    p = Path(path)
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.pt"))
        raise StartCheckpointError(f"starting checkpoint {p} is a directory (jam-ckpt output?): pass one of its "
                                   f"files, {p}/{found[0] if found else 'checkpoint.pt'}")
    if not p.is_file():
        raise StartCheckpointError(f"starting checkpoint not found: {p}")
    try:
        reader = open_checkpoint(p)
        load_model(reader, config=config, vocab=vocab, device="meta")
    except UnsafePickleError as e:
        raise StartCheckpointError(_unsafe_hint(str(e).splitlines()[0], p)) from None
    except CheckpointError as e:
        raise StartCheckpointError(str(e).splitlines()[0]) from None
    mp = reader.mp
    if mp != model_parallel_size:
        raise StartCheckpointError(
            f"{path}: written for model-parallel size {mp}, the run uses --model-parallel-size "
            f"{model_parallel_size}: write its parts with jam-ckpt reshard {path} --mp {model_parallel_size} -o DIR")


def start_checkpoint(*, restore_file: str | None, finetune_from_model: str | None,
                     save_dir: str, suffix: str = "") -> str | None:
    """The file a host will load the starting weights from (None: fresh or resuming its own run),
    resolved as fairseq/metaseq ``checkpoint_utils.load_checkpoint`` do for this rank's ``suffix``
    (``-model_part-{r}``: the host inserts it before every ``.pt`` of the path)."""
    last = Path(save_dir) / f"checkpoint_last{suffix}.pt"
    if finetune_from_model:
        if last.exists():
            return None
        if Path(finetune_from_model).exists() or not suffix:
            return finetune_from_model
        return finetune_from_model.replace(".pt", suffix + ".pt")
    if restore_file and restore_file != "checkpoint_last.pt":
        if int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0) > 0 and last.is_file():
            return None  # a requeued job: metaseq resumes from its own checkpoint_last
        return restore_file.replace(".pt", suffix + ".pt") if suffix else restore_file
    return None


_ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (DataSetupError, StartCheckpointError)


def install_one_line_errors() -> None:
    """Print a ``DataSetupError`` / ``StartCheckpointError`` that ends a host CLI as one line,
    ``PROG: error: MESSAGE`` (as jam-ckpt does), not a traceback; other exceptions are untouched.
    Idempotent; the process still exits with status 1."""
    prev = sys.excepthook
    if getattr(prev, "_jam_one_line", False):
        return

    def hook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(etype, _ONE_LINE_ERRORS):
            msg = str(value).splitlines()[0] if str(value) else etype.__name__
            print(f"{Path(sys.argv[0]).name or 'python'}: error: {msg}", file=sys.stderr, flush=True)
            return
        prev(etype, value, tb)

    hook._jam_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook
