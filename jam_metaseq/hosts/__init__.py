"""Host adapters (fairseq, metaseq): registries and argparse live here, never in the core.

``register_hosts()`` registers the JAM archs, the ``cm3_multimodal`` task and the ``cm3``
criterion with the hosts imported in the process. It is called in two places only: the package's
``__init__``, which a host imports as its ``--user-dir`` (the host is then imported, so it registers
with it), and a program that drives a host in-process after importing the package. Each
registration runs once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

HOSTS = ("fairseq", "metaseq")


def _adapter(host: str) -> Any:
    if host == "fairseq":
        from jam_metaseq.hosts import fairseq as adapter
    else:
        from jam_metaseq.hosts import metaseq as adapter  # type: ignore[no-redef]
    return adapter


def register_hosts(*, import_hosts: bool = False) -> list[str]:
    """Register the JAM models/task/criterion with every host already imported in this process
    (``import_hosts``: with every host installed, importing it first); returns their names."""
    done = []
    for host in HOSTS:
        loaded = host in sys.modules
        if not loaded and not (import_hosts and importlib.util.find_spec(host) is not None):
            continue
        importlib.import_module(host)  # the host first: the adapter imports from it
        _adapter(host).register()
        done.append(host)
    return done
