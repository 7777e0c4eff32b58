"""Host adapters (fairseq, metaseq): registries and argparse live here, never in the core.

Nothing registers on import. A host registers the JAM archs, the ``cm3_multimodal`` task and the
``cm3`` criterion when it imports ``jam_metaseq`` as its ``--user-dir`` (``register_as_user_dir``,
called by the package's ``__init__``); a program that drives a host itself calls
``register_hosts()``. Each registration runs once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import FrameType
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


def user_dir_host(frame: FrameType | None) -> str | None:
    """The host whose ``utils.import_user_module`` (the one function through which fairseq's and
    metaseq's CLIs, hub and checkpoint loaders import a ``--user-dir``) is on the call stack at or
    above ``frame``; None when something else is importing us."""
    while frame is not None:
        if frame.f_code.co_name == "import_user_module":
            host = str(frame.f_globals.get("__name__", "")).partition(".")[0]
            if host in HOSTS:
                return host
        frame = frame.f_back
    return None


def register_as_user_dir() -> str | None:
    """Register with the host importing the package as its ``--user-dir``, if one is; returns
    its name. The package's ``__init__`` calls this; from anywhere else it is a no-op."""
    host = user_dir_host(sys._getframe(1))
    if host is not None:
        _adapter(host).register()
    return host
