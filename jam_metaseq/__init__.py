"""jam_metaseq: Joint Autoregressive Mixture (JAM) models for metaseq and fairseq.

This file is the ``--user-dir`` entry point. ``fairseq-train --user-dir .../jam_metaseq`` and
``metaseq-train --user-dir ...`` (the repository's copy or the installed one) import the package
through their ``utils.import_user_module``, with the host already imported, and importing it
registers the JAM archs (``jam_uniform``/``jam_width``/``jam_cross`` and their
``_tiny``/``_1_3b``/``_7b`` sizes), the ``cm3_multimodal`` task and the ``cm3`` criterion with every
host already imported in the process, once (``jam_metaseq.hosts.register_hosts``). Imported
before any host (a tool, a notebook, ``jam-ckpt``), it imports no host and registers nothing; a
program that imports a host afterwards and runs it in-process calls
``jam_metaseq.hosts.register_hosts()`` itself (the hosts import a ``--user-dir`` only once).
"""

from jam_metaseq.hosts import register_hosts as _register_hosts

__version__ = "0.1.0"

_register_hosts()
