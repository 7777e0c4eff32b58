"""jam_metaseq: Joint Autoregressive Mixture (JAM) models for metaseq and fairseq.

Importing the package has no side effects. Given as a host's ``--user-dir``
(``fairseq-train --user-dir .../jam_metaseq``, ``metaseq-train --user-dir ...``, the repository's
copy or the installed one), it is imported by that host's ``utils.import_user_module``, and then
registers the JAM archs (``jam_uniform``/``jam_width``/``jam_cross`` and their
``_tiny``/``_1_3b``/``_7b`` sizes), the ``cm3_multimodal`` task and the ``cm3`` criterion with that
host, once per process. A program that runs a host in-process after importing this package calls
``jam_metaseq.hosts.register_hosts()`` itself (the hosts import a ``--user-dir`` only once).
"""

__version__ = "0.1.0"


def _register_as_user_dir() -> None:
    from jam_metaseq.hosts import register_as_user_dir

    register_as_user_dir()


_register_as_user_dir()
