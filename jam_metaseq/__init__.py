"""jam_metaseq: Joint Autoregressive Mixture (JAM) models for metaseq and fairseq."""

__version__ = "0.1.0"
