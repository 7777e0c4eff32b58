"""Recorded jam-ckpt outputs for the key-schema change: sha256s in tests/data/schema_golden.json.

What the schema feeds into a written file: the model-parallel split of every tensor (MP parts),
the FSDP unit of every tensor (shards), the host flags pickled as ``cfg["model"]`` and the keys
themselves. Each case fuses or reshards two tiny parents into one layout and records the sha256
of every weight file and of every tensor read back consolidated (name, dtype, shape, bytes).

Parents are drawn from integers (``torch.randint``: the same on every CPU) scaled by a power of
two, so they are exact in fp16 and the fusion arithmetic on them is exact in fp32. JAM-Cross
draws its new weights with ``torch.randn``, whose float32 kernel differs between torch's CPU
dispatch levels (DEFAULT vs AVX2): those cases keep ``fixed_tensors`` (the tensors that are not
drawn, compared everywhere) and the rest under ``drawn[randn_fingerprint]``, recorded on this
CPU's dispatch and on torch's DEFAULT one.

  PYTHONPATH=. python tests/_schema_golden.py --record     # rewrite tests/data/schema_golden.json
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
DATA = HERE / "data" / "schema_golden.json"
IMAGE_VOCAB = (64, 100)
OPS = {  # cross: recorded before per-block draws became the default; the per-block digests are in _ckpt_golden.py
    "merge": {},
    "widen-copy": {"init": "copy"},
    "cross-paper": {"init": "paper", "seed": 7, "cross_every": 2, "init_seed_scheme": "per-tensor"},
    "cross-preserve": {"init": "preserve", "seed": 7, "cross_every": 1, "init_seed_scheme": "per-tensor"},
}
LAYOUTS = {"mp1": {"mp": 1}, "mp2": {"mp": 2}, "mp2-fsdp2": {"mp": 2, "fsdp": 2}}
RESHARDS = {"cross-preserve/mp2-fsdp2->mp1": ("cross-preserve", "mp2-fsdp2", "mp1"),
            "widen-copy/mp2->mp1-fsdp2": ("widen-copy", "mp2", "mp1-fsdp2")}
LAYOUTS_OUT = {**LAYOUTS, "mp1-fsdp2": {"mp": 1, "fsdp": 2}}


# The parents, their digests and the list of drawn tensors are the ones of the fusion golden file.
from _ckpt_golden import golden_parent, randn_fingerprint, tensors_digest  # noqa: E402
from _ckpt_golden import random_names as drawn_names  # noqa: E402


def make_parents(tmp: Path) -> tuple[Path, Path]:
    """The two parents on disk: the LLM as MP=2 parts, the image model as FSDP shards."""
    from _ckpt_util import save_metaseq

    cfg, a = golden_parent(101)
    _, b = golden_parent(202)
    return save_metaseq(tmp / "llm", cfg, a, mp=2), save_metaseq(tmp / "img", cfg, b, fsdp=2)


def _opts(out: Path, lay: str):
    from checkpoints_tools import ops
    from checkpoints_tools.io import OutputSpec

    return ops.CommonOptions(spec=OutputSpec(out_dir=out, **LAYOUTS_OUT[lay]), progress=False,
                             hash_sources="none")


def run_case(op: str, lay: str, pa: Path, pb: Path, out: Path) -> Path:
    from checkpoints_tools import ops

    kw = dict(OPS[op])
    opts = _opts(out, lay)
    if op == "merge":
        return ops.merge([pa, pb], opts=opts)
    if op.startswith("widen"):
        return ops.widen(pa, pb, opts=opts, **kw)
    return ops.cross(pa, pb, opts=opts, image_vocab=IMAGE_VOCAB, **kw)


def run_reshard(case: str, pa: Path, pb: Path, tmp: Path) -> Path:
    from checkpoints_tools import ops

    op, lay_in, lay_out = RESHARDS[case]
    src = run_case(op, lay_in, pa, pb, tmp / "src")
    return ops.reshard(src, opts=_opts(tmp / "out", lay_out))


def digest_output(out: Path, op: str) -> dict[str, Any]:
    """A case's record (JAM-Cross: files and whole-state digest under the randn fingerprint)."""
    from checkpoints_tools.readers import open_checkpoint

    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(out.iterdir()) if f.suffix in (".pt", ".safetensors")}
    state = OrderedDict(open_checkpoint(out).items())
    rec: dict[str, Any] = {"files": files, "tensors": tensors_digest(state)}
    if op.startswith("cross"):
        drawn = set(drawn_names(list(state), OPS[op]["init"]))
        return {"fixed_tensors": tensors_digest(state, [n for n in state if n not in drawn]),
                "drawn": {randn_fingerprint(): rec}}
    return rec


def record(tmp: Path) -> dict[str, Any]:
    pa, pb = make_parents(tmp)
    cases = {f"{op}/{lay}": digest_output(run_case(op, lay, pa, pb, tmp / f"{op}-{lay}"), op)
             for op in OPS for lay in LAYOUTS}
    for case in RESHARDS:
        cases[case] = digest_output(run_reshard(case, pa, pb, tmp / case.replace("/", "_")), RESHARDS[case][0])
    return cases


def record_all() -> dict[str, Any]:
    """Every case here and again under torch's DEFAULT CPU dispatch (the drawn cases under both
    fingerprints; the others must agree)."""
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
                raise SystemExit(f"{name}: the tensors that are not drawn differ under DEFAULT dispatch")
            rec["drawn"].update(other[name]["drawn"])
        elif other[name] != rec:
            raise SystemExit(f"{name}: differs under DEFAULT dispatch (it should not depend on the CPU)")
    return cases


def main() -> None:
    import argparse
    import subprocess
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help=f"write {DATA.relative_to(HERE.parent)}")
    ap.add_argument("--print", action="store_true", help="print this process's records as JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    if args.print:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(record(Path(d))))
        return
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    data = {"recorded_at_commit": rev, "torch": torch.__version__, "cases": record_all()}
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if args.record:
        DATA.parent.mkdir(exist_ok=True)
        DATA.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
