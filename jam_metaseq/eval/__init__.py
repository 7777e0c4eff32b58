"""Evaluation (paper §3.2-3.3, Tables 1-5): perplexity and zero-shot multiple choice.

- ``ppl``: ``perplexity(model, sequences, *, vocab, ...)`` (Wikipedia-style text PPL, MS-COCO-style
  image-caption PPL; definition and window rule in its docstring), ``evaluate_ppl_files``.
- ``io``: ``read_sequences``, ``save_checkpoint`` (checkpoints are read by ``checkpoints_tools.load_model``).
- ``lm_eval_adapter``: the lm-evaluation-harness model ``jam`` (imports lm_eval; import it explicitly).
- ``tasks`` / ``zeroshot``: local YAML tasks for PIQA, ARC-E/C, StoryCloze, Winograd, Winogrande and
  ``run_zeroshot``.
- ``cli``: ``jam-eval ppl | lm-eval | tasks``.
"""

from jam_metaseq.eval.ppl import perplexity

__all__ = ["perplexity"]
