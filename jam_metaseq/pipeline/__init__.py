"""``jam run PLAN.yaml``: the whole JAM pipeline, declared in a plan (paper §2-3).
See ``pipeline.spec`` for the plan, ``pipeline.run`` for the entry points."""
