"""Where a ``jam run`` puts its outputs: the folder names of budgets and instruct mixtures.

Layout under the output folder: ``data/``, ``data-<budget>/`` (grown sets), ``tokenizers/``,
``bin/``, ``bin-<budget>/``, ``parents/{llm,img}``, ``fused/<variant>``,
``pretrain/<budget>/<variant>``, ``instruct/<variant>/<mixture>``, ``eval/...``, ``report/``,
``generate/``. The paths of what each stage writes are ``pipeline.stages.context``'s.
"""

from __future__ import annotations


def budget_tag(tokens: int) -> str:
    """A budget's folder name: ``192k``, ``3M``, or the exact count."""
    for unit, n in (("M", 1_000_000), ("k", 1_000)):
        if tokens % n == 0:
            return f"{tokens // n}{unit}"
    return str(tokens)


def mixture_name(mixture: dict[str, float]) -> str:
    return "+".join(k if w == 1 else f"{k}{w:g}" for k, w in mixture.items())


__all__ = ["budget_tag", "mixture_name"]
