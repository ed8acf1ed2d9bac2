"""Domains in the data config (`data.domains`, `data.only_domain`) and their checks.

A domain is a named part of the corpus; every training sequence lies inside one domain
and carries its id (the position of its name). `data.domains` is one of:
- "topics": the built-in corpus (pydoc_data) split by topic family, `TOPIC_FAMILIES`;
- "subfolders": `data.path` is a folder and each of its subfolders is a domain (names
  sorted); files directly in the folder belong to none;
- a mapping {name: [glob, ...]} over topic names (built-in corpus) or file paths
  relative to the folder `data.path` ("*" also matches "/").
An item (topic or file) belongs to the FIRST domain with a matching pattern, so a last
domain with "*" takes the rest; items no domain matches are left out.
`data.only_domain` keeps one domain alone with the same membership: the data a domain
sub-model (`moge extract`) is evaluated on.
"""

from __future__ import annotations

from typing import Any

# The built-in corpus's 79 topics (CPython 3.11-3.13) in four families of about 90-150 KB.
TOPIC_FAMILIES: dict[str, list[str]] = {
    "statements": [
        "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del",
        "else", "exceptions", "execmodel", "for", "function", "global", "if", "import", "naming",
        "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield",
    ],
    "expressions": [
        "atom-*", "attribute-references", "await", "binary", "bitwise", "booleans", "calls",
        "comparisons", "conversions", "dict", "exprlists", "floating", "formatstrings", "identifiers",
        "imaginary", "in", "integers", "lambda", "lists", "numbers", "operator-summary", "power",
        "shifting", "slicings", "strings", "subscriptions", "unary",
    ],
    "library": ["debugger", "string-methods", "types?*"],
    "datamodel": ["*"],  # the data model (specialnames, types, customization, ...) and the rest
}  # fmt: skip
DOMAIN_KINDS = ("topics", "subfolders")


def check_domains_spec(domains: Any, only_domain: Any, path: Any) -> None:
    """Validate data.domains / data.only_domain (ValueError naming the field)."""
    if only_domain is not None and (not isinstance(only_domain, str) or not only_domain):
        raise ValueError(f"data.only_domain: expected a domain name, got {only_domain!r}")
    if domains is None:
        if only_domain is not None:
            raise ValueError("data.only_domain: needs data.domains (the domains to choose from)")
        return
    if isinstance(domains, str):
        if domains not in DOMAIN_KINDS:
            raise ValueError(
                f"data.domains: expected one of {', '.join(DOMAIN_KINDS)} or a mapping name -> [glob, ...]; "
                f"got {domains!r}"
            )
        if domains == "topics" and path is not None:
            raise ValueError("data.domains: topics splits the built-in corpus; set data.path to null")
        if domains == "subfolders" and path is None:
            raise ValueError(
                "data.domains: subfolders needs data.path, a folder whose subfolders are the domains"
            )
    elif isinstance(domains, dict) and domains:
        for name, patterns in domains.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"data.domains: domain names must be non-empty strings, got {name!r}")
            ok = isinstance(patterns, list) and patterns and all(isinstance(p, str) and p for p in patterns)
            if not ok:
                raise ValueError(
                    f"data.domains: domain {name!r}: expected a non-empty list of globs, got {patterns!r}"
                )
    else:
        raise ValueError(
            f"data.domains: expected topics, subfolders or a mapping name -> [glob, ...]; got {domains!r}"
        )
    names = static_domain_names(domains)
    if only_domain is not None and names is not None and only_domain not in names:
        raise ValueError(
            f"data.only_domain: unknown domain {only_domain!r}; data.domains has {', '.join(names)}"
        )


def static_domain_names(domains: Any) -> list[str] | None:
    """Domain names known without reading the data (None for subfolders or no domains)."""
    if domains == "topics":
        return list(TOPIC_FAMILIES)
    if isinstance(domains, dict):
        return list(domains)
    return None


def selected_names(names: list[str], only_domain: str | None) -> list[str]:
    return names if only_domain is None else [only_domain]


def check_names_match(data_names: list[str], moe: Any, where: str) -> None:
    """The data's domains (ids in order) must be the model's, moe.rre_domain_groups, in order."""
    model_names = list(moe.rre_domain_groups or {})
    if not model_names:
        return  # one-level routers take no domains: data domains only label the sequences
    if data_names == model_names:
        return
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise ValueError(
            f"data.domains: domain {unknown[0]!r} ({where}) has no expert groups; "
            f"moe.rre_domain_groups maps {', '.join(model_names)}"
        )
    missing = [n for n in model_names if n not in data_names]
    if missing:
        raise ValueError(
            f"moe.rre_domain_groups: domain {missing[0]!r} is not in the data ({where}: {', '.join(data_names)})"
        )
    raise ValueError(
        f"moe.rre_domain_groups: the domains' order ({', '.join(model_names)}) differs from the data's "
        f"({where}: {', '.join(data_names)}); domain ids follow it, so list them in the same order"
    )


def check_run_domains(cfg: Any) -> None:
    """RunConfig-level checks between data.domains and moe.rre_domain_groups."""
    groups = cfg.moe.rre_domain_groups
    if not groups:
        return
    if cfg.data.domains is None:
        if len(groups) > 1:
            raise ValueError(
                f"moe.rre_domain_groups: {len(groups)} domains need data whose sequences carry a domain "
                "(data.domains: topics, subfolders or a mapping)"
            )
    else:
        names = static_domain_names(cfg.data.domains)
        if names is not None:
            check_names_match(selected_names(names, cfg.data.only_domain), cfg.moe, "data.domains")
    if cfg.parallel.expert_parallel > 1:
        raise ValueError(
            "parallel.expert_parallel: the two-level random router (moe.rre_domain_groups) sends each "
            "domain's tokens to its own groups, so ranks get uneven loads; keep parallel.expert_parallel=1 "
            "(several processes train it data-parallel)"
        )
