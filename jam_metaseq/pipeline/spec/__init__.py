"""The plan of ``jam run PLAN.yaml`` (paper §2-3), in four rooms:

- ``schema``: the typed plan (``PlanSpec`` and its parts, one docstring per field) and its
  structural validation (``parse_plan``: every problem named by field and line);
- ``yaml_io``: YAML in and out (``read_plan_file``, the one reader of a plan file; ``load_plan``;
  ``apply_override`` for ``--set``; ``plan_yaml``, commented YAML that reads back equal);
- ``variants``: the catalogue of JAM variants (``VARIANTS``), the parents' roles (``PARENTS``);
- ``quickstart``: the built-in plan of ``jam quickstart`` (``quickstart_plan``).

Their public names are importable from here. Checks that look at files and checkpoints live in
``pipeline.check``.

Public API::

    load_plan(path, *, overrides=()) -> PlanSpec      # PlanError naming field and line
    parse_plan(mapping, *, source, base_dir, lines) -> PlanSpec
    plan_yaml(plan) -> str                            # commented; load_plan(it) == plan
    quickstart_plan(*, steps=1.0, scale=1, ...) -> PlanSpec
    VARIANTS, Variant, PARENTS, PAPER_CROSS
"""

from jam_metaseq.pipeline.spec.quickstart import QUICKSTART_UPDATES, quickstart_plan
from jam_metaseq.pipeline.spec.schema import (
    CONVERSATION_FORMATS, SOURCES, DataSpec, EvalSpec, Files, GenerateSpec, GeneratorSpec, ImageTokenizerSpec, InstructFiles, InstructSpec,
    OptimSpec, ParentSpec, ParentsSpec, ParentTrainSpec, PlanError, PlanSpec, PretrainSpec, RunSpec, ShapeSpec,
    SlurmSpec, TextTokenizerSpec, field_name, parse_plan, resolve_paths,
)
from jam_metaseq.pipeline.spec.variants import PAPER_CROSS, PARENTS, VARIANTS, Variant
from jam_metaseq.pipeline.spec.yaml_io import (
    apply_override, load_plan, parse_yaml, plan_dict, plan_yaml, read_plan_file,
)

__all__ = [
    "CONVERSATION_FORMATS", "DataSpec", "EvalSpec", "Files", "GenerateSpec", "GeneratorSpec", "ImageTokenizerSpec", "InstructFiles",
    "InstructSpec", "OptimSpec", "PAPER_CROSS", "PARENTS", "ParentSpec", "ParentTrainSpec", "ParentsSpec",
    "PlanError", "PlanSpec", "PretrainSpec", "QUICKSTART_UPDATES", "RunSpec", "SOURCES", "ShapeSpec", "SlurmSpec",
    "TextTokenizerSpec", "VARIANTS", "Variant", "apply_override", "field_name", "load_plan", "parse_plan",
    "parse_yaml", "plan_dict", "plan_yaml", "quickstart_plan", "read_plan_file", "resolve_paths",
]
