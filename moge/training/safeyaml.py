"""Bounded, strict YAML for config files: what `yaml.safe_load` lets through, refused early.

- Only regular files are read (a device such as /dev/zero or a FIFO would never end or
  block), and at most `MAX_BYTES` of them.
- A key repeated in one mapping is an error naming both lines (safe_load keeps the last).
- Nesting deeper than `MAX_DEPTH` is an error (safe_load recurses until RecursionError).
- Aliases are counted as what they expand to: a document whose values, expanded, number
  more than `MAX_NODES` is an error (a "billion laughs" file of a few hundred bytes
  expands to gigabytes the moment anything prints or copies it).
- An integer that YAML 1.1 (PyYAML) and YAML 1.2 read differently is an error naming its
  line: a leading zero means octal in 1.1 (`seed: 0042` would be 34) and decimal in 1.2,
  a colon means base 60 in 1.1 (`1:30` would be 90) and a string in 1.2.
- Errors never quote more than a bounded excerpt of a value (`moge._validate.shown`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from moge._validate import shown

MAX_BYTES = 1 << 20  # configs are a few KiB
MAX_DEPTH = 32
MAX_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and bounds depth and alias expansion."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Any) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # complex keys: safe_load refuses unhashable ones; `<<` merges
                key = self.construct_object(key_node)  # `true` and `True`, `16` and `0x10` are one key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.YAMLError(
                        f"line {line}: duplicate key {shown(key_node.value)} (first on line {seen[key]})"
                    )
                seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        value = super().construct_yaml_int(node)
        digits = node.value.replace("_", "")
        unsigned = digits.lstrip("+-")
        line = node.start_mark.line + 1
        if ":" in unsigned:
            raise yaml.YAMLError(
                f"line {line}: {shown(node.value)[1:-1]} is a base-60 number in YAML 1.1 ({value}) but "
                "a string in YAML 1.2; write the number, or quote the text"
            )
        if len(unsigned) > 1 and unsigned[0] == "0" and unsigned[1].isdigit() and int(digits, 10) != value:
            raise yaml.YAMLError(
                f"line {line}: {shown(node.value)[1:-1]} is octal in YAML 1.1 ({value}) but "
                f"{int(digits, 10)} in YAML 1.2; write it without the leading zero"
            )
        return value


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _check_expansion(root: Any) -> None:
    """Count the nodes of the document with every alias expanded; refuse more than MAX_NODES."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order DFS; a shared (aliased) node is sized once
        node, done = stack.pop()
        if done:
            active.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[id(node)] > MAX_NODES:
                raise yaml.YAMLError(
                    f"line {node.start_mark.line + 1}: the document holds more than {MAX_NODES:,} "
                    "values once its aliases are expanded (an alias bomb?)"
                )
            continue
        if id(node) in sizes:
            continue
        if id(node) in active:
            raise yaml.YAMLError(
                f"line {node.start_mark.line + 1}: an alias refers to a value that contains it"
            )
        active.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _children(node: Any) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def loads(text: str, source: str) -> Any:
    """Parse one YAML document strictly; any problem -> ValueError starting with `source`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {_bounded(str(err))}") from None
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. an int of 5000 digits
        raise ValueError(f"{source}: a value cannot be read: {_bounded(str(err))}") from None


def _bounded(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def read_file(path: Path, max_bytes: int = MAX_BYTES) -> Any:
    """Parse a YAML file that must be a regular, UTF-8 file of at most max_bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a folder, not a config file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a device, FIFO or socket); pass a YAML file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes:,} bytes; a config file is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid YAML: not UTF-8 text (byte {err.start})") from None
    return loads(text, str(path))
