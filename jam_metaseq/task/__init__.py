"""The ``cm3_multimodal`` training task, host-free (paper §3.1 Objective, Training): the items of
a split (binarized blocks, mixture order, retrieval prefixes, the CM3 transform) and their batches,
in ``items``. Both hosts' task classes (``jam_metaseq.hosts``) wrap it; a plain PyTorch loop can use
it as it is. It sits above ``data`` (the format and packing of the blocks it reads) and
``retrieval`` (the documents it prefixes).
"""
