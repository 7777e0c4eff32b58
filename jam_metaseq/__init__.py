"""jam_metaseq: Joint Autoregressive Mixture (JAM) models for metaseq and fairseq.

Importing the package registers the JAM archs (``jam_uniform``/``jam_width``/``jam_cross`` and
their ``_tiny``/``_1_3b``/``_7b`` sizes), the ``cm3_multimodal`` task and the ``cm3`` criterion with
the host (fairseq, metaseq) in use, exactly once per process: at once when the host is already
loaded (its CLI importing us through ``--user-dir``), otherwise right after the host is imported
(an import hook). The package itself never imports a host.
"""

__version__ = "0.1.0"


def _register_with_hosts() -> None:
    from jam_metaseq.hosts import install_import_hook, register_hosts

    register_hosts()
    install_import_hook()


_register_with_hosts()
