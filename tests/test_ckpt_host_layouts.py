"""The files fully-sharded host runs write, as the checkpoint tools must read and name them
(docs/CHECKPOINTS.md, Files). Fast stand-ins of what the metaseq and fairseq CPU runs showed
(``tests/test_hosts_metaseq_fsdp.py``, ``tests/test_hosts_fsdp_fairseq.py`` check it on the real
trainers' files)."""

from __future__ import annotations

import pytest
import torch

from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.writers import OutputSpec
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
