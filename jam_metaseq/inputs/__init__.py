"""Untrusted input, one home per class (issue 27; the threat model is ``docs/TESTING.md``).

Every value that comes from outside (an argument, a file, a manifest, a plan) is checked once, where
it enters, by the module of its class; the rest of the code then trusts it:

1. ``names``: a name taken from input becomes one safe path component (``safe_component``); an
   output directory resolves without a traceback (``resolve_output_dir``).
2. ``structured`` (JSON, YAML, integers), ``archives`` (zip records), ``images``, ``files``:
   bounded parsing of containers that may lie: JSON and YAML with a nesting bound (and, in YAML, a
   bound on what aliases expand to), no lone surrogates, no non-finite numbers; zip records
   inflated with a cap, in chunks; images bounded by their header's pixel count; integers
   range-checked before they reach numpy or torch; a file that changed while it was read. Each
   refuses with an ``InputError`` (``refusal``).
3. ``fields``: manifest and config fields checked for type, sign and range where they are read;
   a flag that contradicts what the tensors prove is an error naming both values (``agree``).
4. ``numbers``: every float option is finite and in range at parse time, every count bounded
   (argparse types ``finite_float`` / ``bounded_int``, and ``check_float`` for library callers).
5. ``scripts``: every value written into a generated script passes ``script_value`` for its
   position (an ``#SBATCH`` directive takes one plain word; a shell word is validated and quoted).

This package sits just above ``jam_metaseq.errors`` and imports nothing else of the project, so the
checkpoint tools, the pipeline, the hosts and every CLI can use it.
"""

from __future__ import annotations

from .fields import FieldError, agree, int_field, str_field
from .names import MAX_COMPONENT_BYTES, resolve_output_dir, safe_component
from .numbers import (FINITE, INT64, INT64_MAX, MAX_THREADS, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, PORT,
                      POSITIVE_FLOAT, POSITIVE_INT, RATE, SEED, THREADS, bounded_int, check_float, check_int,
                      finite_float)
from .scripts import ScriptValueError, script_value
from .archives import open_zip_member, read_zip_member, unique_zip_names
from .files import FileSnapshot
from .images import MAX_IMAGE_PIXELS, load_image, load_rgb_image
from .refusal import InputError
from .structured import (MAX_DEPTH, MAX_YAML_NODES, check_int_list, compose_yaml, dumps_json, loads_json, loads_yaml,
                         read_json)

__all__ = [
    "FieldError", "agree", "int_field", "str_field", "MAX_COMPONENT_BYTES", "resolve_output_dir",
    "safe_component", "FINITE", "INT64", "INT64_MAX", "MAX_THREADS", "NON_NEGATIVE_FLOAT", "NON_NEGATIVE_INT",
    "PORT", "POSITIVE_FLOAT", "POSITIVE_INT", "RATE", "SEED", "THREADS", "bounded_int", "check_float",
    "check_int", "finite_float", "ScriptValueError", "script_value", "MAX_DEPTH", "MAX_IMAGE_PIXELS",
    "MAX_YAML_NODES", "FileSnapshot", "InputError", "check_int_list", "compose_yaml", "dumps_json",
    "load_image", "load_rgb_image", "loads_json", "loads_yaml", "open_zip_member", "read_json",
    "read_zip_member", "unique_zip_names",
]
