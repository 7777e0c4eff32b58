"""What lets fairseq and metaseq load, broadcast and start from JAM checkpoints: compatibility
shims installed when a host registers the JAM models (``hosts.common.register_with_host``), never
on import.

- ``allow_checkpoint_globals``: the non-tensor globals host checkpoints hold, allow-listed for
  torch's ``weights_only`` loading (torch >= 2.6), process-wide.
- ``patch_host_upgrader``: a fresh ``jam-ckpt`` file gets the neutral ``optimizer_history`` and
  ``extra_state`` entries the hosts' checkpoint upgraders index into.
- ``patch_host_broadcast``: the hosts' rank-to-rank object broadcast unpickles on torch >= 2.6.
- ``patch_host_unsharded_load`` (metaseq): an unsharded checkpoint loads on more than one
  data-parallel rank.
- ``patch_host_load_checkpoint`` -> ``check_trainer_start``: before the first update, the files a
  trainer starts from (the set of ``-model_part-r``) are opened by the checkpoint loader
  (``checkpoints_tools.load_model`` on the meta device) and checked against the model and
  vocabulary, on every rank.
- ``install_one_line_errors``: such errors (and ``DataSetupError``) end a host CLI with one line.
"""

from __future__ import annotations

import argparse
import os
import re
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
            from checkpoints_tools.io.host_meta import start_optimizer_history

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
        init_fsdp_units(trainer.get_model())  # the FSDP root itself in a fully-sharded run
        return orig(cfg, trainer, *args, **kwargs)

    load_checkpoint._jam_wrapped = True  # type: ignore[attr-defined]
    module.load_checkpoint = load_checkpoint


def patch_host_unsharded_load(module: Any) -> None:
    """metaseq only: wrap ``module.get_paths_to_load`` (``checkpoint_utils``) once so that a file
    written unsharded (``pytorch_ddp``, ``fully_sharded`` without ``--use-sharded-state``, a
    ``jam-ckpt`` file without ``--fsdp``) is read whole at any data-parallel size.

    metaseq's ``load_checkpoint_to_cpu`` compares the number of files it found (1) with the
    data-parallel size and, when that is larger, takes the branch that splits FSDP shards
    between ranks (``AssertionError`` on a name without ``-shard``): on more than one rank such a
    run can neither resume from its own ``checkpoint_last`` nor start from a consolidated file."""
    orig = getattr(module, "get_paths_to_load", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return

    def get_paths_to_load(path: str, suffix: str = "rank-") -> tuple[list[str], int]:
        paths, count = orig(path, suffix=suffix)
        if count == 1 and len(paths) == 1 and not re.search(rf"{re.escape(suffix)}[0-9]+\.pt$", paths[0]):
            count = max(1, int(module.distributed_utils.get_data_parallel_world_size()))
        return paths, count

    get_paths_to_load._jam_wrapped = True  # type: ignore[attr-defined]
    module.get_paths_to_load = get_paths_to_load


def init_fsdp_units(model: Any) -> None:
    """Run the lazy initialisation of every FSDP unit of ``model`` (the root first: it marks the
    others as inner units), as their first forward would. fairscale's ``load_local_state_dict``
    (a fully-sharded run resuming from, or starting from, its ``-shard{j}`` files) frees the
    gathered parameters of every unit afterwards, which fails on a unit that has not run yet
    (``'FlatParameter' object has no attribute '_full_param_padded'``): with one unit per block
    (``hosts.metaseq.shard_blocks``) that is every block before the first update."""
    fsdp = sys.modules.get("fairscale.nn.data_parallel.fully_sharded_data_parallel")
    if fsdp is None or not hasattr(model, "modules"):
        return
    units = [m for m in model.modules() if isinstance(m, fsdp.FullyShardedDataParallel)]
    if len(units) > 1:
        for unit in units:  # pre-order: the root before the blocks it holds
            unit._lazy_init()


def check_trainer_start(cfg: Any, trainer: Any) -> None:
    """``check_start_checkpoint`` for the files this rank's trainer is about to load (its
    ``-model_part-{m}`` at model-parallel size > 1; its ``-shard{d}`` in a fully-sharded run with
    ``--use-sharded-state``, whose shard count must be the run's data-parallel size), then agreed
    on by all ranks, so that no rank waits for one that stopped."""
    model, task = trainer.get_model(), trainer.task
    vocab = getattr(task, "vocab", None)
    suffix = trainer.checkpoint_suffix or ""
    if not hasattr(model, "jam_config") or not isinstance(vocab, VocabManifest):
        return
    mp = getattr(model, "model_parallel_size", 1)
    shards = int(getattr(trainer, "data_parallel_world_size", 1) or 1) if "-shard" in suffix else 0
    error: StartCheckpointError | None = None
    path = start_checkpoint(restore_file=getattr(cfg, "restore_file", None),
                            finetune_from_model=getattr(cfg, "finetune_from_model", None),
                            save_dir=getattr(cfg, "save_dir", "checkpoints"), suffix=suffix)
    if path is not None:
        try:
            if suffix and not Path(path).exists():
                _explain_missing(path, suffix=suffix, model_parallel_size=mp, fsdp_shards=shards)
            check_start_checkpoint(path, config=model.jam_config, vocab=vocab, model_parallel_size=mp,
                                   fsdp_shards=shards)
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


def _reshard_hint(path: str | Path, *, model_parallel_size: int, fsdp_shards: int) -> str:
    fsdp = f" --fsdp {fsdp_shards}" if fsdp_shards else ""
    return f"jam-ckpt reshard {path} --mp {model_parallel_size}{fsdp} -o DIR"


def _explain_missing(path: str, *, suffix: str, model_parallel_size: int, fsdp_shards: int) -> None:
    """``path`` (the start file with this rank's ``suffix``) does not exist: when the file without
    the suffix does, say which layout the run loads and how to write it."""
    whole = path.replace(f"{suffix}.pt", ".pt")
    if not Path(whole).is_file():
        return  # check_start_checkpoint reports the missing file
    pattern = re.sub(r"shard[0-9]+", "shard{d}", re.sub(r"model_part-[0-9]+", "model_part-{m}", suffix))
    per_rank = f"one {pattern} file per rank"
    if fsdp_shards:
        raise StartCheckpointError(
            f"{path}: not found; {whole} is one whole file and this fully-sharded run (--use-sharded-state, "
            f"data-parallel size {fsdp_shards}) loads {per_rank}: write them with "
            f"{_reshard_hint(whole, model_parallel_size=model_parallel_size, fsdp_shards=fsdp_shards)}")
    if model_parallel_size > 1:
        raise StartCheckpointError(
            f"{path}: not found; {whole} is one consolidated file and --model-parallel-size {model_parallel_size} "
            f"loads {per_rank}: write them with "
            f"{_reshard_hint(whole, model_parallel_size=model_parallel_size, fsdp_shards=0)}")
    raise StartCheckpointError(
        f"{path}: not found; metaseq names the start file of a run on several processes with {suffix}: start "
        f"from the whole file with --finetune-from-model {whole}, or, fully sharded (--use-sharded-state), from "
        f"the shards jam-ckpt reshard {whole} --fsdp N -o DIR writes for N data-parallel ranks")


class StartCheckpointError(ValueError):
    """A starting checkpoint the run cannot use; raised while the model is built, before training.
    The host CLIs print it as one line (``install_one_line_errors``)."""


class ModelSetupError(ValueError):
    """A model the run cannot build as asked (e.g. a model-parallel size that splits a k/v head);
    raised while the model is built, printed as one line like ``StartCheckpointError``."""


def _unsafe_hint(msg: str, path: str | Path) -> str:
    """jam-ckpt's message for a refused global, with the way out a host run has (no --trust-pickle)."""
    head = msg.split("; pass --trust-pickle", 1)[0]
    return (f"{head}; if you trust this file, rewrite it without them: "
            f"jam-ckpt convert {path} --to metaseq -o DIR --trust-pickle")


def check_start_checkpoint(path: str | Path, *, config: Any, vocab: VocabManifest,
                           model_parallel_size: int = 1, fsdp_shards: int = 0) -> None:
    """Stop before training when the starting weights cannot fit this model (``config``) and
    vocabulary: the checkpoint loader (``checkpoints_tools.load_model`` on the meta device: every
    name and shape checked, no tensor data read; pickles through ``safe_load``'s allow-list) over
    the whole set of files the ranks load (``path`` is this rank's ``-model_part-{r}[-shard{d}]``
    file), which must be split for ``model_parallel_size`` and, for a fully-sharded run loading
    sharded state (``fsdp_shards`` = its data-parallel size; 0: the run loads unsharded files),
    sharded into that many FSDP shards per part. Errors become ``StartCheckpointError`` with
    jam-ckpt's one-line message."""
    from checkpoints_tools.load import load_model
    from checkpoints_tools.readers import open_checkpoint
    from checkpoints_tools.readers.infer import stored_config
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
        check_same_function(p, stored_config(reader), config)
    except UnsafePickleError as e:
        raise StartCheckpointError(_unsafe_hint(str(e).splitlines()[0], p)) from None
    except CheckpointError as e:
        raise StartCheckpointError(str(e).splitlines()[0]) from None
    hint = _reshard_hint(path, model_parallel_size=model_parallel_size, fsdp_shards=fsdp_shards)
    if reader.mp != model_parallel_size:
        raise StartCheckpointError(
            f"{path}: written for model-parallel size {reader.mp}, the run uses --model-parallel-size "
            f"{model_parallel_size}: write its parts with {hint}")
    if fsdp_shards and not reader.fsdp:
        raise StartCheckpointError(
            f"{path}: holds whole (unsharded) tensors, but this fully-sharded run (--use-sharded-state) loads "
            f"one FSDP shard per data-parallel rank ({fsdp_shards}): write them with {hint}")
    if fsdp_shards and reader.fsdp != fsdp_shards:
        raise StartCheckpointError(
            f"{path}: written as {reader.fsdp} FSDP shard(s) per model part, but the run's data-parallel size is "
            f"{fsdp_shards}: write {fsdp_shards} with {hint}")
    if not fsdp_shards and reader.fsdp:
        raise StartCheckpointError(
            f"{path}: FSDP shards ({reader.fsdp} per model part) load only into a fully-sharded run with "
            f"--ddp-backend fully_sharded --use-sharded-state at data-parallel size {reader.fsdp}; for this "
            f"run, consolidate them: {_reshard_hint(path, model_parallel_size=model_parallel_size, fsdp_shards=0)}")


def check_same_function(path: Path, stored: Any, config: Any) -> None:
    """The starting checkpoint's stored config (None: it stores none) and the run's model compute
    the same function: equal in every ``FUNCTION_FIELDS`` field (norm kind, rotary settings,
    activation, embedding scale, padding), per branch. Names and shapes (``load_model``) cannot
    tell a Gemma checkpoint (``rmsnorm_plus_one``) trained as a Llama one (``rmsnorm``)."""
    from jam_metaseq.models.config import FUNCTION_FIELDS, CrossConfig

    if stored is None:
        return
    pairs = [(stored, config)] if not isinstance(stored, CrossConfig) else [(stored.llm, getattr(config, "llm", config))]
    for have, want in pairs:
        for f in FUNCTION_FIELDS:
            if getattr(have, f) != getattr(want, f, getattr(have, f)):
                raise StartCheckpointError(
                    f"{path}: stored with {f}={getattr(have, f)!r}, but the run builds {f}={getattr(want, f)!r}: "
                    "give the arch of the checkpoint's family (e.g. --arch jam_cross_gemma_7b) or its flags")


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


_ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (DataSetupError, StartCheckpointError, ModelSetupError)


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
