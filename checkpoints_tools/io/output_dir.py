"""One model written atomically: ``OutputDir`` takes consolidated tensors one at a time, casts and
splits them into model-parallel pieces (``layout``), and writes each rank's piece on that rank's
writer thread into its file(s): metaseq ``.pt`` (plain, or FSDP shards), one safetensors file,
or an HF directory (``hf``: the model's family layout, sharded with an index, ``io/hf_dir.py``).
Everything goes into a temp directory next to the target,
``manifest.json`` (sizes, sha256s, tensors) last, then one rename (``target``); on any error or
interrupt the temp directory is removed and no output appears.

Layouts follow ``docs/CHECKPOINTS.md``: ``{name}.pt`` (consolidated), ``{name}-model_part-{r}.pt``
(MP), ``-shard{j}`` (FSDP; ``-model_part-0`` too at MP=1 once the layout is for several processes, as
metaseq names them), so metaseq's ``--restore-file OUT/{name}.pt`` finds the parts. A tied
output projection is written as the embedding's alias: the same storage in ``.pt`` files (as
``torch.save`` does), ``__metadata__[OUTPUT] = EMBED`` in safetensors (the ``safetensors``
library's record of a tensor it stored once), ``shared_param_info`` in FSDP shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from checkpoints_tools import layout
from checkpoints_tools.io.errors import OutputError, write_error
from checkpoints_tools.io.fsdp import FsdpRank, Unit, fsdp_unit
from checkpoints_tools.io.hashed_file import fsync_dir, write_json_fsync
from checkpoints_tools.io.hf_dir import DEFAULT_MAX_SHARD_SIZE, FORMATS as HF_FORMATS, HFDirWriter, check_hf_layout
from checkpoints_tools.io.host_meta import checkpoint_meta
from checkpoints_tools.io.safetensors import SafetensorsStreamWriter
from checkpoints_tools.io.target import (
    check_free_space, check_output_target, current_umask, install_output, owned_name_parts, remove_tree,
    sweep_stale,
)
from checkpoints_tools.io.torch_zip import TorchStreamWriter
from checkpoints_tools.workspace import Workspace
from jam_metaseq.inputs import FileSnapshot, resolve_output_dir, safe_component
from jam_metaseq.models import keys
from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
from jam_metaseq.models.config import CrossConfig, ModelConfig
from jam_metaseq.vocab import CHECKPOINT_KEY as VOCAB_KEY

TIED = keys.TIED


@dataclass
class OutputSpec:
    """Where and how to write one model."""

    out_dir: Path
    """Final directory (must not exist unless ``overwrite``)."""
    format: str = "metaseq"
    """``metaseq`` (.pt files), ``safetensors`` (one consolidated file) or ``hf`` (an HF directory
    of the model's family; ``hf_{model_type}``: that family, e.g. ``hf_opt``)."""
    mp: int = 1
    """Target model-parallel size."""
    fsdp: int = 0
    """FSDP shards per MP rank (0 = plain, unflattened state dicts)."""
    dtype: torch.dtype | None = None
    """Output dtype of floating tensors (None = as produced)."""
    name: str = "checkpoint"
    """File stem: ``{name}.pt`` / ``{name}-model_part-{r}[-shard{j}].pt`` / ``{name}.safetensors``."""
    overwrite: bool = False
    """Replace an existing jam-ckpt output directory (one with manifest.json), atomically."""
    overwrite_any_dir: bool = False
    """Replace an existing directory even if it is not a jam-ckpt output (implies ``overwrite``)."""
    allow_non_finite: bool = False
    """Write tensors holding NaN or inf (issue 27 §4; default: such a tensor stops the output, e.g.
    an fp16 overflow of ``--weights 1e5 1e5 --dtype fp16``); the manifest then lists them."""
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    """HF outputs: bytes per safetensors shard at most (more than one shard: with the index)."""

    def __post_init__(self) -> None:
        # issue 27 §1: the stem is joined to the output directory; ``../victim/in`` would write (or
        # truncate) a file elsewhere, an input among them
        safe_component(self.name, what="--name (the output files' stem)")

    def file_names(self) -> list[list[str]]:
        """[rank][shard] -> file name: metaseq's names for a run of ``mp`` x ``fsdp`` processes,
        which carry ``-model_part-{r}`` whenever that is more than one process (metaseq's
        distributed start adds it, at model-parallel size 1 too) and ``-shard{j}`` with FSDP."""
        if self.format == "safetensors":
            return [[f"{self.name}.safetensors"]]
        out = []
        for r in range(self.mp):
            part = f"-model_part-{r}" if self.mp * max(self.fsdp, 1) > 1 else ""
            if self.fsdp:
                out.append([f"{self.name}{part}-shard{j}.pt" for j in range(self.fsdp)])
            else:
                out.append([f"{self.name}{part}.pt"])
        return out


def estimate_output_bytes(shapes: Mapping[str, Sequence[int]], *, spec: OutputSpec,
                          dtypes: Mapping[str, torch.dtype]) -> int:
    """Bytes of the files ``spec`` writes for tensors of ``shapes`` in ``dtypes`` (replicated
    tensors once per MP rank; a tied output projection not at all in ``.pt`` files)."""
    total = 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        dt = dtypes[name]
        if name == TIED[1] and spec.format != "safetensors":
            continue  # aliased to the embedding in .pt files
        copies = spec.mp if layout.rule_for(name) == "replicated" else 1
        total += n * dt.itemsize * copies
    return total


class OutputDir:
    """Write one model atomically: ``open``, ``add`` tensors in plan order, then ``commit`` (or
    ``abort``). Creating one checks the target (``check_output_target``; ``inputs``: the files
    read, which the output must not be or contain) and clears what dead runs left next to it
    (``sweep_stale``); ``open`` makes the temp dir. The first failure of any write, on any
    writer thread, is the one reported (``first_error``), and writes queued after it are
    skipped."""

    def __init__(self, spec: OutputSpec, *, cfg: ModelConfig, shapes: Mapping[str, Sequence[int]],
                 vocab: Mapping[str, Any] | None = None, check_space: bool = True,
                 inputs: Sequence[Path] = ()) -> None:
        if spec.format not in ("metaseq", "safetensors", *HF_FORMATS):
            raise OutputError(f"unknown output format {spec.format!r}")
        if spec.format == "safetensors" and (spec.mp != 1 or spec.fsdp):
            raise OutputError(f"{spec.format} output is consolidated: use --mp 1 without --fsdp")
        self._family = check_hf_layout(spec.format, cfg, mp=spec.mp, fsdp=spec.fsdp) \
            if spec.format in HF_FORMATS else None
        if spec.mp < 1 or spec.fsdp < 0:
            raise OutputError(f"bad layout mp={spec.mp} fsdp={spec.fsdp}")
        out = Path(spec.out_dir)
        resolve_output_dir(out, what="output directory (-o)")  # a symlink loop: one line, not a traceback
        if out.name in ("", ".", ".."):
            out = Path(os.path.abspath(out))
        sweep_stale(Path(os.path.abspath(out)))
        check_output_target(out, overwrite=spec.overwrite, overwrite_any_dir=spec.overwrite_any_dir, inputs=inputs)
        if spec.mp > 1:
            branches = ([("", cfg.llm)] if cfg.symmetric else [(" (LLM branch)", cfg.llm), (" (image branch)", cfg.img)]) \
                if isinstance(cfg, CrossConfig) else [("", cfg)]
            for label, parent in branches:
                layout.check_mp(heads=parent.heads, vocab_size=parent.vocab_size, ffn_dim=parent.ffn_dim,
                                embed_dim=parent.embed_dim, parts=spec.mp, what=f"target {out}{label}",
                                kv_heads=parent.num_kv_heads)
        self.spec, self.cfg, self.vocab = spec, cfg, vocab
        self._model_ties = cfg.tied_output if isinstance(cfg, CrossConfig) else cfg.tie_embeddings
        """The model's output projection is its embedding (False: Llama-2/3's own head)."""
        self.shapes = collections.OrderedDict((k, tuple(int(s) for s in v)) for k, v in shapes.items())
        self.out = out
        self.inputs = list(inputs)
        # issue 27 §2: an input rewritten while it is streamed would give an output mixed from two
        # versions; what identifies each input file now is compared again before the commit
        self._snapshots = [FileSnapshot.of(p) for p in dict.fromkeys(self.inputs) if os.path.isfile(p)]
        self.tmp: Path | None = None  # made by open()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._done: set[str] = set()
        self._tied_sha: list[str | None] = [None] * spec.mp
        self._tied_stub: list[Any] = [None] * spec.mp
        self.tensor_meta: dict[str, dict[str, Any]] = {}
        self.non_finite: set[str] = set()
        """Tensors written with NaN or inf (only with ``spec.allow_non_finite``)."""
        names = spec.file_names()
        self._st: SafetensorsStreamWriter | None = None
        self._hf: HFDirWriter | None = None
        self._pt: list[list[TorchStreamWriter]] = []
        self._fsdp: list[FsdpRank] = []
        self._plain: list[dict[str, Any]] = []
        self._dtypes: dict[str, torch.dtype] = {}
        self._check_space = check_space
        self._st_names = names
        self._ws = Workspace()  # cast buffers (one per slot), reused tensor after tensor
        self._rank_ws = [Workspace() for _ in range(spec.mp)]  # packed MP pieces, per writer thread
        self._expect_tied = False

    def _out_dtype(self, name: str, produced: torch.dtype) -> torch.dtype:
        if self.spec.dtype is not None and produced.is_floating_point and not keys.is_version(name):
            return self.spec.dtype
        if keys.is_version(name) and self.spec.dtype is not None:
            return self.spec.dtype  # metaseq casts buffers with the model (.half())
        return produced

    def open(self, dtypes: Mapping[str, torch.dtype]) -> None:
        """Make the temp dir and create the files; ``dtypes`` = the dtype each tensor will be
        produced in."""
        self._dtypes = {n: self._out_dtype(n, dtypes[n]) for n in self.shapes}
        parent = Path(os.path.abspath(self.out)).parent
        parent.mkdir(parents=True, exist_ok=True)
        if self._check_space:
            check_free_space(self.out, estimate_output_bytes(self.shapes, spec=self.spec, dtypes=self._dtypes))
        # Next to the target (same filesystem: the final rename is atomic), named after this
        # process so that a later run can tell whether it is still alive (sweep_stale).
        prefix, suffix = owned_name_parts("tmp", self.out.name)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        self._open_files()

    def _shown(self, name: str) -> Path:
        """The path errors name for an output file: where it was going to be."""
        return self.out / name

    def _open_files(self) -> None:
        if self._family is not None:
            self._hf = HFDirWriter(self.tmp, family=self._family, cfg=self.cfg, shapes=self.shapes,
                                   dtype=self._dtypes[keys.EMBED], max_shard_size=self.spec.max_shard_size,
                                   shown=self._shown, vocab=self.vocab)
            return
        if self.spec.format == "safetensors":
            md = {"format": "pt", CONFIG_KEY: json.dumps(self.cfg.to_dict())}
            if self.vocab:
                md[VOCAB_KEY] = json.dumps(dict(self.vocab))
            if self._expect_tied:
                md[TIED[1]] = TIED[0]
            plan = [(n, s, self._dtypes[n]) for n, s in self.shapes.items()
                    if not (self._expect_tied and n == TIED[1])]
            self._st = SafetensorsStreamWriter(self.tmp / self._st_names[0][0], plan, md,
                                               shown=self._shown(self._st_names[0][0]))
            return
        self._pt = [[TorchStreamWriter(self.tmp / f, shown=self._shown(f)) for f in rank] for rank in self._st_names]
        if self.spec.fsdp:
            buffers = [n for n in self.shapes if keys.is_version(n)]
            # Copies of the names: pickle writes an object it has written before as a reference, so
            # the bytes would depend on whether the tensor names are these very string objects.
            shared = [tuple(n.encode().decode() for n in TIED)] \
                if self._model_ties and all(t in self.shapes for t in TIED) else []
            for r in range(self.spec.mp):
                units: dict[str, Unit] = {}
                for n in self.shapes:
                    if n in buffers or (shared and n == TIED[1]):
                        continue
                    path, local = fsdp_unit(n)
                    units.setdefault(path, Unit(path, [])).names.append(local)
                self._fsdp.append(FsdpRank(self._pt[r], units, shared, buffers))
        else:
            self._plain = [collections.OrderedDict() for _ in range(self.spec.mp)]

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype ``name`` is written in (after ``open``): producing in it saves a cast."""
        return self._dtypes[name]

    @property
    def aliases_tied(self) -> bool:
        """The files store the output projection as the embedding itself: ``.pt`` layouts alias its
        storage (as ``torch.save`` does), safetensors stores it once and names the alias in
        ``__metadata__`` (``__metadata__[OUTPUT] = EMBED``); HF files have no output projection when tied
        (``lm_head`` is tied by the config)."""
        return self._model_ties and all(t in self.shapes for t in TIED) and self.shapes[TIED[0]] == self.shapes[TIED[1]]

    def expect_tied(self) -> None:
        """The caller will write the output projection with ``add_tied`` (its sources are tied):
        the embedding then need not be hashed for the comparison ``add`` makes, and a safetensors
        file stores it once. Call before ``open``."""
        if not self.aliases_tied:
            raise OutputError(f"{self.out}: this layout does not alias {TIED[1]} to {TIED[0]}")
        if self.tmp is not None:
            raise OutputError(f"{self.out}: expect_tied after open")
        self._expect_tied = True

    def add_tied(self, name: str, *, pools: Sequence[concurrent.futures.Executor] | None = None
                 ) -> list[concurrent.futures.Future]:
        """Write ``name`` (the output projection) as an alias of the embedding (per rank on
        ``pools[r]``, after that rank's embedding; None = now)."""
        if name != TIED[1] or not self._expect_tied:
            raise OutputError(f"tensor {name}: cannot be written tied (call expect_tied first; only {TIED[1]})")
        if TIED[0] not in self._done:
            raise OutputError(f"tensor {name}: tied to {TIED[0]}, which is not written yet")
        if name in self._done:
            raise OutputError(f"tensor {name} written twice")
        self._done.add(name)
        self.tensor_meta[name] = dict(self.tensor_meta[TIED[0]])
        if self.spec.fsdp or self._st is not None or self._hf is not None:
            return []  # FSDP: shared_param_info; safetensors: in the header; HF: the config's tie

        def alias(r: int) -> None:
            self._plain[r][name] = self._tied_stub[r]

        return [_submit(pools[r] if pools else None, alias, r) for r in range(self.spec.mp)]

    @property
    def writer_count(self) -> int:
        """How many files can be written in parallel (one per output MP rank; 1 for safetensors)."""
        return self.spec.mp if self.spec.format == "metaseq" else 1

    def _pieces(self, name: str, t: torch.Tensor) -> list[Any]:
        """The MP pieces of ``t``: tensors (views where possible; with FSDP the pieces are kept
        until their unit is complete, ``t`` is then the caller's own copy) or, for qkv, the
        (K_r, V_r, Q_r) views to concatenate. Packing strided pieces is left to the rank's writer
        thread (``_write_rank``), into one buffer per rank."""
        M = self.spec.mp
        if M == 1 or self.spec.fsdp:
            return layout.split(name, t, M)
        if layout.rule_for(name) == "qkv":  # rank r = [K_r; V_r; Q_r]
            if t.shape[0] % (3 * M):
                raise ValueError(f"tensor {name}: {t.shape[0]} rows (3 x parts) not divisible by "
                                 f"model-parallel size {M}")
            k, v, q = torch.chunk(t, 3, dim=0)
            ks, vs, qs = (torch.chunk(x, M, dim=0) for x in (k, v, q))
            return [(ks[r], vs[r], qs[r]) for r in range(M)]
        return layout.split(name, t, M)

    def _prepare(self, name: str, tensor: torch.Tensor, slot: int | None) -> torch.Tensor:
        """Checks, bookkeeping and the cast to the written dtype (into this slot's buffer; a
        new tensor when ``slot`` is None)."""
        if name not in self.shapes:
            raise OutputError(f"unexpected tensor {name} (not in the target model)")
        if tuple(tensor.shape) != self.shapes[name]:
            raise OutputError(f"tensor {name}: produced shape {tuple(tensor.shape)}, target {self.shapes[name]}")
        if name in self._done:
            raise OutputError(f"tensor {name} written twice")
        dt = self._dtypes[name]
        if self.spec.fsdp:
            t = tensor.to(dt, copy=True)  # held until its FSDP unit is complete: our own copy
        elif tensor.dtype != dt:
            t = tensor.to(dt) if slot is None else self._ws.get(f"cast{slot}", tensor.shape, dt).copy_(tensor)
        else:
            t = tensor
        self.tensor_meta[name] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        self._done.add(name)
        return t

    def _check_finite(self, name: str, piece: Any) -> None:
        """Every value of a written floating-point tensor is finite unless ``allow_non_finite``
        (issue 27 §4). Runs on the writer threads, beside the next tensor's reads, as one reduction
        in the written dtype: ``aminmax`` propagates NaN, and an inf is the minimum or the maximum
        (a tenth of the time of a float32 sum, which would also overflow on big finite values)."""
        for t in piece if isinstance(piece, tuple) else (piece,):
            if not t.is_floating_point() or keys.is_version(name) or t.numel() == 0:
                continue
            lo, hi = torch.aminmax(t)
            if math.isfinite(lo) and math.isfinite(hi):
                continue
            if not self.spec.allow_non_finite:
                raise OutputError(f"tensor {name} holds non-finite values (NaN or inf) as {str(t.dtype).replace('torch.', '')}"
                                  " (a NaN in the inputs or weights, or an overflow of the output dtype): nothing was "
                                  "written; pass --allow-non-finite to write it anyway")
            with self._error_lock:
                self.non_finite.add(name)

    def _write_single(self, name: str, t: torch.Tensor) -> None:
        """safetensors / HF outputs: tensors in plan order (HF: each into its shard)."""
        self._check_finite(name, t)
        if self._hf is not None:
            self._hf.add(name, t)
        else:
            self._st.add(name, t)

    def _write_rank(self, r: int, name: str, piece: Any) -> None:
        """Rank ``r``'s piece of ``name`` into its file(s). Touches only rank ``r``'s state, so
        ranks may be written by different threads (each in order)."""
        if self.spec.fsdp:  # kept until the unit is complete: views of the caller's own copy
            pass
        elif isinstance(piece, tuple):  # qkv blocks -> one contiguous piece
            rows = sum(p.shape[0] for p in piece)
            buf = self._rank_ws[r].get("piece", (rows, *piece[0].shape[1:]), piece[0].dtype)
            piece = torch.cat(piece, dim=0, out=buf)
        elif not piece.is_contiguous():  # a column block (row-parallel linear)
            piece = self._rank_ws[r].get("piece", piece.shape, piece.dtype).copy_(piece)
        self._check_finite(name, piece)
        if name in TIED and self._model_ties and all(x in self.shapes for x in TIED) and not self._expect_tied:
            sha = hashlib.sha256(piece.contiguous().view(-1).view(torch.uint8).numpy().data).hexdigest()
            if name == TIED[0]:
                self._tied_sha[r] = sha
            elif sha == self._tied_sha[r] and self._tied_stub[r] is not None:
                # Tied output projection: alias the embedding's storage (as torch.save would).
                if not self.spec.fsdp:
                    self._plain[r][name] = self._tied_stub[r]
                return
            elif self.spec.fsdp:
                raise OutputError(f"tensor {name} differs from {TIED[0]}: cannot write it tied into FSDP shards")
        if self.spec.fsdp:
            self._fsdp[r].add(name, piece)
            if name == TIED[0]:
                self._tied_stub[r] = True
        else:
            stub = self._pt[r][0].add(piece)
            self._plain[r][name] = stub
            if name == TIED[0]:
                self._tied_stub[r] = stub

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` now. It may be a caller's reused buffer: nothing keeps a reference."""
        for f in self.add_async(name, tensor, slot=0, pools=None):
            f.result()

    def add_async(self, name: str, tensor: torch.Tensor, *, slot: int | None,
                  pools: Sequence[concurrent.futures.Executor] | None) -> list[concurrent.futures.Future]:
        """Cast and split ``tensor`` here, then write rank r's piece on ``pools[r]`` (one
        single-thread executor per output rank; None = write now). ``tensor`` and this slot's
        cast buffer must stay untouched until the returned futures are done."""
        if self._error is not None:
            raise self._error
        t = self._prepare(name, tensor, slot)
        if self._st is not None or self._hf is not None:
            return [_submit(pools[0] if pools else None, self._guarded, self._write_single, name, t)]
        return [_submit(pools[r] if pools else None, self._guarded, self._write_rank, r, name, piece)
                for r, piece in enumerate(self._pieces(name, t))]

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One queued write: skipped (raising the first failure) once a write failed or
        ``abort`` began, so a failed file never shows up as a later, confusing error."""
        if self._error is not None:
            raise self._error
        try:
            return fn(*args)
        except BaseException as e:  # noqa: B036 - recorded, re-raised
            first = self.record_error(e)
            if first is e:
                raise
            raise first from None

    def record_error(self, e: BaseException) -> BaseException:
        """Keep ``e`` if it is the first failure of this output; returns the first failure."""
        with self._error_lock:
            if self._error is None:
                self._error = e
            return self._error

    @property
    def first_error(self) -> BaseException | None:
        return self._error

    def commit(self, *, manifest_extra: Mapping[str, Any]) -> Path:
        """Close every file, write vocab.json and manifest.json (last), then put the directory
        in place (``install_output``: atomic, also when it replaces an earlier output)."""
        if self._error is not None:
            raise self._error
        if self.tmp is None:
            raise OutputError(f"{self.out}: commit before open")
        missing = [n for n in self.shapes if n not in self._done]
        if missing:
            raise OutputError(f"{len(missing)} tensor(s) never produced, e.g. {missing[:3]}")
        for snap in self._snapshots:
            snap.check_unchanged()
        files: dict[str, dict[str, Any]] = {}
        if self._st is not None:
            sha, nb = self._st.finish()
            files[self._st.path.name] = {"sha256": sha, "bytes": nb}
        elif self._hf is not None:
            files.update({f: {"sha256": sha, "bytes": nb} for f, (sha, nb) in self._hf.finish().items()})
            for f, data in self._hf.small_files().items():
                self._write_small(f, lambda path, data=data: path.write_bytes(data))
                files[f] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        else:
            meta = checkpoint_meta(self.cfg, mp=self.spec.mp, fsdp=self.spec.fsdp, vocab=self.vocab)
            for r, rank in enumerate(self._pt):
                for j, w in enumerate(rank):
                    obj = dict(meta)
                    if self.spec.fsdp:
                        obj["model"] = self._fsdp[r].models[j]
                        obj["shard_metadata"] = self._fsdp[r].shard_metadata(j)
                    else:
                        obj["model"] = self._plain[r]
                    sha, nb = w.finish(obj)
                    files[w.path.name] = {"sha256": sha, "bytes": nb}
        if self.vocab:
            data = (json.dumps(dict(self.vocab), indent=2) + "\n").encode()
            self._write_small("vocab.json", lambda path: path.write_bytes(data))
            files["vocab.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {
            "manifest_version": 1,
            "created_by": "jam-ckpt",
            "config": self.cfg.to_dict(),
            "layout": {"format": self.spec.format, "mp": self.spec.mp, "fsdp": self.spec.fsdp,
                       "name": self.spec.name,
                       "dtype": str(self.spec.dtype).replace("torch.", "") if self.spec.dtype else None},
            "files": files,
            "tensors": self.tensor_meta,
            "vocab": "vocab.json" if self.vocab else None,
            **dict(manifest_extra),
        }
        if self.non_finite:
            manifest["non_finite_tensors"] = sorted(self.non_finite)
        self._write_small("manifest.json", lambda path: write_json_fsync(path, manifest))
        fsync_dir(self.tmp)
        # mkdtemp made it 0700; the output is shared like any other directory the user makes.
        os.chmod(self.tmp, 0o777 & ~current_umask())
        # Checked again: the target may have changed while the model was written.
        check_output_target(self.out, overwrite=self.spec.overwrite, overwrite_any_dir=self.spec.overwrite_any_dir,
                            inputs=self.inputs)
        tmp, self.tmp = self.tmp, None
        try:
            install_output(tmp, self.out, replace=os.path.lexists(self.out))
        except BaseException:  # noqa: B036 - whatever is left at tmp (new or old output) is removed by abort
            self.tmp = tmp
            raise
        return self.out

    def _write_small(self, name: str, write: Callable[[Path], Any]) -> None:
        try:
            write(self.tmp / name)
        except OSError as e:
            raise write_error(self._shown(name), e) from e

    def abort(self) -> None:
        """Stop: queued writes are skipped, the files discarded, the temp dir removed."""
        self.record_error(OutputError(f"{self.out}: writing was aborted"))
        for rank in self._pt:
            for w in rank:
                w.abort()
        if self._st is not None:
            self._st.abort()
        if self._hf is not None:
            self._hf.abort()
        if self.tmp is not None:
            remove_tree(self.tmp)
            self.tmp = None


def _submit(pool: concurrent.futures.Executor | None, fn: Any, *args: Any) -> concurrent.futures.Future:
    if pool is not None:
        return pool.submit(fn, *args)
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(fn(*args))
    return f
