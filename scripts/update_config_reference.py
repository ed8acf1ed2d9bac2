"""Rewrite README.md's config reference from the dataclasses' field comments.

    python scripts/update_config_reference.py

tests/tools/test_docs.py fails when README.md and the code disagree; this script mends it.
"""

from pathlib import Path

from moge.tools.docs import README_MARKERS, replace_config_reference

readme = Path(__file__).resolve().parents[1] / "README.md"
readme.write_text(replace_config_reference(readme.read_text(encoding="utf-8")), encoding="utf-8")
print(f"updated the config reference between {README_MARKERS[0]} and {README_MARKERS[1]} in {readme}")
