"""jam_metaseq: Joint Autoregressive Mixture (JAM) models for metaseq and fairseq.

Importing the package registers the JAM archs (``jam_uniform``/``jam_width``/``jam_cross`` and
sized variants), the ``cm3_multimodal`` task and the ``cm3`` criterion with whichever host
(fairseq, metaseq) is already loaded: that is the case when a host CLI imports us through
``--user-dir``. Otherwise nothing host-related is imported (the core never needs a host); call
``jam_metaseq.hosts.register_hosts(import_hosts=True)`` to register explicitly.
"""

__version__ = "0.1.0"


def _register_with_loaded_hosts() -> None:
    import sys

    if "fairseq" in sys.modules or "metaseq" in sys.modules:
        from jam_metaseq.hosts import register_hosts

        register_hosts()


_register_with_loaded_hosts()
