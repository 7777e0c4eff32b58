"""The files fully-sharded host runs write, as the checkpoint tools must read and name them
(docs/CHECKPOINTS.md, Files). Fast stand-ins of what the metaseq and fairseq CPU runs showed
(``tests/test_hosts_metaseq_fsdp.py``, ``tests/test_hosts_fsdp_fairseq.py`` check it on the real
trainers' files)."""

from __future__ import annotations

import pytest
import torch

from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.io import OutputSpec
from _ckpt_util import assert_state_equal, save_metaseq, tiny_parent

torch.set_num_threads(1)


def test_fairseq_fsdp_metadata_is_read(tmp_path):
    """fairseq's trainer saves fairscale's shard metadata as ``fsdp_metadata`` (metaseq's as
    ``shard_metadata``): the same shards under either key read back to the same state."""
    cfg, state = tiny_parent(5)
    src = save_metaseq(tmp_path, cfg, state, fsdp=2)
    for j in range(2):
        f = tmp_path / f"checkpoint_last-shard{j}.pt"
        obj = torch.load(f, weights_only=False)
        obj["fsdp_metadata"] = obj.pop("shard_metadata")
        torch.save(obj, f)
    reader = open_checkpoint(src)
    assert (reader.mp, reader.fsdp) == (1, 2)
    assert_state_equal(dict(reader.items()), state)


@pytest.mark.parametrize("mp,fsdp,names", [
    (1, 0, [["checkpoint.pt"]]),
    (1, 1, [["checkpoint-shard0.pt"]]),  # one process: metaseq adds no part number
    (1, 2, [["checkpoint-model_part-0-shard0.pt", "checkpoint-model_part-0-shard1.pt"]]),
    (2, 0, [["checkpoint-model_part-0.pt"], ["checkpoint-model_part-1.pt"]]),
    (2, 2, [["checkpoint-model_part-0-shard0.pt", "checkpoint-model_part-0-shard1.pt"],
            ["checkpoint-model_part-1-shard0.pt", "checkpoint-model_part-1-shard1.pt"]]),
])
def test_output_names_are_the_ones_a_metaseq_run_of_that_size_loads(tmp_path, mp, fsdp, names):
    """metaseq names a rank's files ``-model_part-{m}`` whenever the run has more than one
    process (its distributed start adds the part number at model-parallel size 1 too) and
    ``-shard{d}`` with sharded state: ``--restore-file OUT/checkpoint.pt`` of a run of ``mp`` x
    ``fsdp`` processes finds the files ``jam-ckpt --mp mp --fsdp fsdp`` wrote."""
    assert OutputSpec(out_dir=tmp_path, mp=mp, fsdp=fsdp).file_names() == names


def _unflattened_shards(state: dict, world: int, out, *, cfg_dict: dict) -> None:
    """What fairseq-train ``--use-sharded-state --not-fsdp-flatten-parameters`` writes (one root
    unit): every parameter chunked on its own, each chunk padded to the first one's size; the tied
    output projection listed nowhere in the metadata but present in the state dict as the very
    tensor of the embedding's shard."""
    params = {k: v for k, v in state.items() if k != "decoder.version" and k != "decoder.output_projection.weight"}
    for j in range(world):
        model, entries = {"decoder.version": state["decoder.version"].clone()}, {}
        for k, v in params.items():
            chunks = list(v.reshape(-1).chunk(world))
            chunks += [v.new_empty(0)] * (world - len(chunks))
            pad = chunks[0].numel() - chunks[j].numel()
            model[k] = torch.cat([chunks[j], chunks[j].new_zeros(pad)])
            entries[k] = {"names": [k], "shapes": [tuple(v.shape)], "numels": [v.numel()], "padding": pad}
        model["decoder.output_projection.weight"] = model["decoder.embed_tokens.weight"]
        meta = {"param_metadata": [{"fsdp_path": "", "params": entries, "no_broadcast_optim_state": False,
                                    "shared_param_info": []}], "buffer_names": ["decoder.version"]}
        torch.save({"model": model, "fsdp_metadata": meta, "cfg": cfg_dict, "optimizer_history": [],
                    "extra_state": {}}, out / f"checkpoint_last-shard{j}.pt")


def test_unflattened_shards_keep_the_tied_output_projection(tmp_path):
    """Unflattened FSDP units describe the tied output projection nowhere; it is read as the
    embedding it shares storage with (it was silently missing: 'no tensor ...output_projection')."""
    cfg, state = tiny_parent(6)
    _unflattened_shards(state, 3, tmp_path, cfg_dict=torch.load(save_metaseq(tmp_path / "ref", cfg, state),
                                                                   weights_only=False)["cfg"])
    reader = open_checkpoint(tmp_path / "checkpoint_last-shard0.pt")
    assert (reader.mp, reader.fsdp) == (1, 3)
    assert reader.tied("decoder.embed_tokens.weight", "decoder.output_projection.weight")
    assert_state_equal(dict(reader.items()), state)


def test_a_tensor_the_shard_metadata_does_not_describe_is_an_error(tmp_path):
    from checkpoints_tools.safe_load import CheckpointError

    cfg, state = tiny_parent(7)
    save_metaseq(tmp_path, cfg, state, fsdp=2)
    f = tmp_path / "checkpoint_last-shard1.pt"
    obj = torch.load(f, weights_only=False)
    obj["model"]["decoder.extra.weight"] = torch.zeros(3)
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match=r"'decoder.extra.weight' is in the state dict but not in its FSDP"):
        open_checkpoint(tmp_path / "checkpoint_last-shard0.pt")
