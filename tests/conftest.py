"""Opt-in check that no result depends on the thread count (docs/TESTING.md).

``JAM_TEST_THREADS=N pytest ...`` runs every in-process test with N torch threads, those that pin one
thread for speed (``torch.set_num_threads(1)``) included. Unset, nothing changes. Subprocess tests
(fairseq-train) keep their own ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import os

import torch

_THREADS = os.environ.get("JAM_TEST_THREADS")
if _THREADS:
    torch.set_num_threads(int(_THREADS))
    torch.set_num_threads = lambda n: None  # the pins in the test modules become no-ops
