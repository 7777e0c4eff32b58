"""Document functions for the local Winograd (WSC273) and Winogrande tasks (paper Table 1).

Copied next to the generated YAML files as ``jam_task_utils.py`` (lm_eval resolves ``!function``
relative to the YAML file). They reproduce lm_eval's ``wsc273`` and ``winogrande`` tasks: partial
scoring, where each choice is a different context ending at the blank and the shared rest of the
sentence is the scored continuation.
"""

from __future__ import annotations

from typing import Any

_UPPER_PRONOUNS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


def _wsc_option(doc: dict[str, Any], option: str) -> str:
    # possessive pronouns take the option's possessive form
    if doc["pronoun"].lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    first = option.split()[0]
    start_of_sentence = doc["text"][doc["pronoun_loc"] - 2] == "."
    if not start_of_sentence and first in _UPPER_PRONOUNS:
        return option.replace(first, first.lower())
    return option


def wsc273_process_docs(dataset: Any) -> Any:
    def fn(doc: dict[str, Any]) -> dict[str, Any]:
        doc["text"] = doc["text"].replace("  ", " ")
        doc["options"] = [_wsc_option(doc, doc["options"][0]), _wsc_option(doc, doc["options"][1])]
        return doc

    return dataset.map(fn)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
