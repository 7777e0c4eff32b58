"""Generated tokens recorded before the decode step and the loader were each written once
(issue 15 items 3 and 5), checked in every decode mode and through ``jam-generate``'s loading path.

The tiny models' weights are integers k in [-1024, 1024) scaled by 2^-11 (LayerNorm weights
1 + k 2^-12), drawn by ``torch.randint`` (the same bits on any CPU), in float64: the tokens depend
on no CPU's rounding (docs/TESTING.md, rule 4). The record holds, per architecture and generation
case, the token ids of three prompts with seeds 7, 8, 9; every mode (eager, eager without the KV
cache, static with two key blocks, graph -- static off CUDA) and the checkpoint path
(``generation.run.generate_answers``) must give exactly those ids.

  PYTHONPATH=. python tests/test_generation_golden.py --record     # rewrite tests/data/generation_golden.json
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _generation_util import ARCHS, PROMPTS, VOCAB, one_thread, tiny_config  # noqa: E402,F401
from jam_metaseq.generation.engine import Engine, GenerationConfig  # noqa: E402
from jam_metaseq.generation.sampling import SamplingConfig  # noqa: E402
from jam_metaseq.models import build_model  # noqa: E402

DATA = HERE / "data" / "generation_golden.json"
N = VOCAB.image_tokens_per_image
SEEDS = [7, 8, 9]
CASES = {
    "cfg, text and two images": dict(max_new_tokens=40, min_images=2),
    "no guidance": dict(max_new_tokens=30, min_images=1, guidance=False),
    "greedy": dict(max_new_tokens=24, min_images=1, text=SamplingConfig(temperature=0.0),
                   image=SamplingConfig(temperature=0.0)),
    "top-k, top-p, penalty, text-to-image": dict(
        max_new_tokens=N + 6, force_image_first=True, text=SamplingConfig(top_k=5, repetition_penalty=1.3),
        image=SamplingConfig(top_p=0.8)),
    "text only, done early": dict(max_new_tokens=30, max_images=0, check_done_every=3),
}
MODES = {"eager": dict(decode="eager"), "uncached": dict(decode="eager", use_cache=False),
         "static-8": dict(decode="static", key_block=8), "static-0": dict(decode="static", key_block=0),
         "graph": dict(decode="graph", key_block=16)}


def golden_model(arch: str) -> torch.nn.Module:
    """``tiny_config(arch)`` in float64 with integer-drawn weights (module docstring)."""
    model = build_model(tiny_config(arch)).double().eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            k = torch.randint(-1024, 1024, p.shape, generator=g).double()
            p.copy_(1.0 + k * 2.0**-12 if "layer_norm" in name and name.endswith("weight") else k * 2.0**-11)
    return model


def generate(model: torch.nn.Module, case: str, **engine_kw) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph off CUDA falls back to static with a warning
        e = Engine(model, vocab=VOCAB, **engine_kw)
    return [a.ids for a in e.generate(PROMPTS, config=GenerationConfig(**CASES[case]), seeds=SEEDS)]


def record() -> dict[str, dict[str, list[list[int]]]]:
    out: dict[str, dict[str, list[list[int]]]] = {}
    for arch in ARCHS:
        model = golden_model(arch)
        out[arch] = {}
        for case in CASES:
            ids = generate(model, case)
            for mode, kw in MODES.items():  # the modes agreed when recorded
                assert generate(model, case, **kw) == ids, (arch, case, mode)
            out[arch][case] = ids
    return out


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, list[list[int]]]]:
    return json.loads(DATA.read_text())


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, golden_model(request.param)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_decode_mode_gives_the_recorded_tokens(arch_model, mode, golden):
    arch, model = arch_model
    for case in CASES:
        assert generate(model, case, **MODES[mode]) == golden[arch][case], (arch, case, mode)


def test_recorded_tokens_are_not_trivial(golden):
    """The record can fail a wrong step: seeds differ, images are present, rows finish differently."""
    for arch in ARCHS:
        for case, rows in golden[arch].items():
            if case != "greedy":
                assert len({tuple(r) for r in rows}) == len(rows), (arch, case)
        assert any(VOCAB.is_image(t) for r in golden[arch]["cfg, text and two images"] for t in r)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_answers_from_a_checkpoint_gives_the_recorded_tokens(arch, golden, tmp_path):
    """``jam-generate``'s path: the checkpoint loader, float64, every decode mode."""
    from jam_metaseq.eval.io import save_checkpoint
    from jam_metaseq.generation.run import PromptSpec, generate_answers

    save_checkpoint(tmp_path / "checkpoint.pt", golden_model(arch), vocab=VOCAB)
    case = "cfg, text and two images"
    prompts = [PromptSpec(ids=p, seed=s) for p, s in zip(PROMPTS, SEEDS)]
    for decode in ("eager", "static", "graph"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            answers = generate_answers(checkpoint=tmp_path / "checkpoint.pt", prompts=prompts,
                                       config=GenerationConfig(**CASES[case]), dtype=torch.float64,
                                       progress=False, decode=decode)
        assert [a.ids for a in answers] == golden[arch][case], (arch, decode)


if __name__ == "__main__":
    if "--record" not in sys.argv:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    DATA.write_text(json.dumps(record(), indent=1) + "\n")
    print(f"wrote {DATA}")
