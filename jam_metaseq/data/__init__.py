"""The multimodal data pipeline (paper §3.1 Tokenizers, Objective, Datasets; §2.2 instruct data).

JSONL documents -> ``documents`` (validation, serialisation with ``<break>``-framed images) ->
``binarize`` (memory-mapped tokens, ``packing`` into blocks) -> ``mixture`` (weighted, resumable
stream) -> ``jam_metaseq.objectives.cm3.cm3_transform`` on the fly. ``tokenizers`` loads the text
tokenizer, ``instruct`` converts LIMA / wikiHow records, ``cli`` is ``jam-data``.
"""
