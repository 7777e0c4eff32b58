"""Recorded jam-ckpt outputs: every fusion path's files as sha256s, kept in tests/data/ckpt_golden.json.

Tiny parents are drawn from integers (``torch.randint``: the same on every CPU) scaled by a
power of two, so they are exact in fp16 and Eq. 1-3 on them is exact in fp32: the outputs
depend on no CPU's rounding. The one exception is JAM-Cross's ``paper`` init under the ``v1``
seed scheme, drawn by ``torch.randn``, whose float32 kernel differs between torch's CPU
dispatch levels (DEFAULT vs AVX2); those cases are recorded per fingerprint of that kernel (``randn_fingerprint``).

Each case records: ``files`` (sha256 of every weight file), ``tensors`` (sha256 over every
tensor as read back consolidated: name, dtype, shape, bytes; independent of the file format),
and for the JAM-Cross cases ``fixed_tensors`` (the same over the tensors that are not drawn)
with the rest under ``drawn[randn_fingerprint]``, recorded on this CPU's dispatch and on torch's
DEFAULT one.

  PYTHONPATH=. python tests/_ckpt_golden.py --record       # add new cases to tests/data/ckpt_golden.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "ckpt_golden.json"
IMAGE_VOCAB = (64, 100)
OPS = {
    "merge": {},
    "widen-copy": {"init": "copy"},
    "widen-average": {"init": "average"},
    "cross-paper": {"init": "paper", "seed": 7, "init_seed_scheme": "per-tensor"},
    "cross-preserve": {"init": "preserve", "seed": 7, "init_seed_scheme": "per-tensor"},
    "cross-paper-per-block": {"init": "paper", "seed": 7, "init_seed_scheme": "per-block"},
}
LAYOUTS = {"metaseq-mp1": {"mp": 1}, "metaseq-mp2": {"mp": 2}, "safetensors": {"format": "safetensors"}}


def golden_parent(seed: int) -> tuple[Any, "OrderedDict[str, torch.Tensor]"]:
    """A tiny fp16 decoder whose every value is k / 2048 for an integer k in [-1024, 1024),
    drawn by ``torch.randint`` (integer draws: the same bits on any CPU); the output projection
    is the embedding (tied, as metaseq saves it)."""
    from jam_metaseq.models import build_model
    from jam_metaseq.models.config import preset

    cfg = preset("tiny")
    with torch.device("meta"):  # the shapes as the model has them, in its state-dict order
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape in shapes.items():
        if name.endswith("version"):
            out[name] = torch.tensor([3.0], dtype=torch.float16)
        elif name == "decoder.output_projection.weight":
            out[name] = out["decoder.embed_tokens.weight"]
        else:
            k = torch.randint(-1024, 1024, shape, generator=g)
            out[name] = (k.to(torch.float32) * 2.0**-11).to(torch.float16)
    return cfg, out


def randn_fingerprint() -> str:
    """sha256 of a fixed ``torch.randn`` draw (float32, > 16 elements: the vectorised kernel)."""
    g = torch.Generator().manual_seed(0)
    return hashlib.sha256(torch.randn(64, generator=g).numpy().tobytes()).hexdigest()


def tensors_digest(state: "OrderedDict[str, torch.Tensor]", names: list[str] | None = None) -> str:
    h = hashlib.sha256()
    for n in sorted(names if names is not None else state):
        t = state[n].contiguous()
        h.update(f"{n}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def random_names(names: list[str], init: str) -> list[str]:
    """The tensors JAM-Cross's init draws at random (§2.1.3: every new weight matrix; new biases
    are zeros, new LayerNorms ones, and ``preserve`` zeroes each cross block's out_proj and fc2 and
    sets the feature projection to [I/2, I/2]), written out here independently of the code."""
    out = []
    for n in names:
        if not (n.startswith("decoder.x_attn_layers_") or n.startswith("decoder.feature_projection.")):
            continue
        if not n.endswith(".weight") or "layer_norm" in n:
            continue
        if init == "preserve" and (n.startswith("decoder.feature_projection.")
                                   or n.endswith(("out_proj.weight", "fc2.weight"))):
            continue
        out.append(n)
    return out


def make_parents(tmp: Path) -> tuple[Path, Path]:
    """The two parents on disk: the LLM as MP=2 parts, the image model as FSDP shards."""
    from _ckpt_util import save_metaseq

    cfg, a = golden_parent(101)
    _, b = golden_parent(202)
    return save_metaseq(tmp / "llm", cfg, a, mp=2), save_metaseq(tmp / "img", cfg, b, fsdp=2)


def run_case(op: str, lay: str, pa: Path, pb: Path, out: Path, **extra: Any) -> Path:
    from checkpoints_tools import ops
    from checkpoints_tools.io import OutputSpec

    opts = ops.CommonOptions(spec=OutputSpec(out_dir=out, **LAYOUTS[lay]), progress=False, hash_sources="none")
    kw = {**OPS[op], **extra}
    if op == "merge":
        return ops.merge([pa, pb], opts=opts)
    if op.startswith("widen"):
        return ops.widen(pa, pb, opts=opts, **kw)
    return ops.cross(pa, pb, opts=opts, cross_every=1, image_vocab=IMAGE_VOCAB, **kw)


def digest_output(out: Path, op: str) -> dict[str, Any]:
    """The case's record. For the JAM-Cross cases the files and the whole-state digest depend on
    the ``torch.randn`` kernel and sit under its fingerprint (``drawn``); ``fixed_tensors``
    covers the tensors that are not drawn."""
    from checkpoints_tools.readers import open_checkpoint

    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(out.iterdir()) if f.suffix in (".pt", ".safetensors")}
    state = OrderedDict(open_checkpoint(out).items())
    rec: dict[str, Any] = {"files": files, "tensors": tensors_digest(state)}
    if op.startswith("cross"):
        drawn = set(random_names(list(state), OPS[op]["init"]))
        return {"fixed_tensors": tensors_digest(state, [n for n in state if n not in drawn]),
                "drawn": {randn_fingerprint(): rec}}
    return rec


def record(tmp: Path) -> dict[str, Any]:
    pa, pb = make_parents(tmp)
    return {f"{op}/{lay}": digest_output(run_case(op, lay, pa, pb, tmp / f"{op}-{lay}"), op)
            for op in OPS for lay in LAYOUTS}


def record_all() -> dict[str, Any]:
    """Every case, recorded here and again under torch's DEFAULT CPU dispatch (another
    ``torch.randn`` kernel where this CPU has AVX2), the drawn cases under both fingerprints."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cases = record(Path(d))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    p = subprocess.run([sys.executable, __file__, "--print"], capture_output=True, text=True, env=env, check=True)
    other = json.loads(p.stdout)
    for name, rec in cases.items():
        if "drawn" in rec:
            if other[name]["fixed_tensors"] != rec["fixed_tensors"]:
                raise SystemExit(f"{name}: the deterministic tensors differ under DEFAULT dispatch")
            rec["drawn"].update(other[name]["drawn"])
        elif other[name] != rec:
            raise SystemExit(f"{name}: differs under DEFAULT dispatch (it should not depend on the CPU)")
    return cases


def main() -> None:
    import argparse
    import subprocess
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true",
                    help=f"add cases missing from {DATA.relative_to(HERE.parent)} (recorded ones must not change)")
    ap.add_argument("--print", action="store_true", help="print this process's records as JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    if args.print:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(record(Path(d))))
        return
    cases = record_all()
    if not args.record:
        print(json.dumps(cases, indent=1, sort_keys=True))
        return
    # Recorded digests are kept: a case already in the file must come out the same (else this
    # refuses); only new cases are added, under a note naming the commit they were recorded at.
    old = json.loads(DATA.read_text()) if DATA.is_file() else {"cases": {}, "notes": []}
    changed = [n for n in old["cases"] if n in cases and cases[n] != old["cases"][n]]
    if changed:
        raise SystemExit(f"these recorded cases come out differently now: {changed}; fix the code, or edit "
                         f"{DATA.name} by hand with a note saying why the bytes changed")
    new = sorted(set(cases) - set(old["cases"]))
    if new:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=HERE).stdout.strip()
        old["cases"].update({n: cases[n] for n in new})
        old.setdefault("notes", []).append(f"Added at {rev} (torch {torch.__version__}): {', '.join(new)}.")
        DATA.parent.mkdir(exist_ok=True)
        DATA.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    print(f"{len(new)} case(s) added, {len(old['cases']) - len(new)} unchanged")


if __name__ == "__main__":
    main()
