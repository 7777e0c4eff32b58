"""Host adapters (fairseq, metaseq): registries and argparse live here, never in the core.

``register_hosts()`` registers with every host already imported in this process (the one whose CLI
is running and importing us as ``--user-dir``); ``register_hosts(import_hosts=True)`` imports
whichever hosts are installed first. ``install_import_hook()`` covers the remaining order (our
package imported first, a host later): it registers right after the host's top-level package
finishes importing, without importing any host itself. Each registration runs once per process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
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
    """Register the JAM models/task/criterion with the hosts; returns the names registered with."""
    done = []
    for host in HOSTS:
        loaded = host in sys.modules
        if not loaded and not (import_hosts and importlib.util.find_spec(host) is not None):
            continue
        importlib.import_module(host)  # the host first: the adapter imports from it
        _adapter(host).register()
        done.append(host)
    return done


class _HostImportHook(importlib.abc.MetaPathFinder):
    """Registers with a host right after ``import fairseq`` / ``import metaseq`` completes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in HOSTS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            if f"jam_metaseq.hosts.{fullname}" in sys.modules:
                return  # the adapter itself is importing the host; its caller registers
            try:
                _adapter(fullname).register()
            except ImportError:  # a host too broken to register with: its own CLI will say so
                pass

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                exec_then_register(module)

        spec.loader = _Loader()
        return spec


_hook: _HostImportHook | None = None


def install_import_hook() -> None:
    """Register with hosts imported after this call (idempotent)."""
    global _hook
    if _hook is None:
        _hook = _HostImportHook()
        sys.meta_path.insert(0, _hook)
