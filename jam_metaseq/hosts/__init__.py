"""Host adapters (fairseq, metaseq): registries and argparse live here, never in the core.

``register_hosts()`` registers with every host already imported in this process (the one whose CLI
is running and importing us as ``--user-dir``); ``register_hosts(import_hosts=True)`` imports
whichever hosts are installed first. Each registration runs once per process.
"""

from __future__ import annotations

import importlib.util
import sys

HOSTS = ("fairseq", "metaseq")


def register_hosts(*, import_hosts: bool = False) -> list[str]:
    """Register the JAM models/task/criterion with the hosts; returns the names registered with."""
    done = []
    for host in HOSTS:
        loaded = host in sys.modules
        if not loaded and not (import_hosts and importlib.util.find_spec(host) is not None):
            continue
        if host == "fairseq":
            from jam_metaseq.hosts import fairseq as adapter
        else:
            from jam_metaseq.hosts import metaseq as adapter  # type: ignore[no-redef]
        adapter.register()
        done.append(host)
    return done
