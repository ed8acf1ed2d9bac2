from pathlib import Path

from moge.tools.docs import README_MARKERS, config_reference, replace_config_reference, undocumented_fields

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_config_field_has_a_comment():
    assert undocumented_fields() == []


def test_readme_config_reference_matches_the_code():
    text = README.read_text(encoding="utf-8")
    assert replace_config_reference(text) == text, "run: python scripts/update_config_reference.py"
    assert config_reference() in text


def test_reference_lists_every_section_and_field():
    ref = config_reference()
    for dotted in ("`model.d_model`", "`moe.top_k`", "`moe.router`", "`data.path`", "`train.resume`",
                   "`eval.plots`", "`parallel.expert_parallel`"):  # fmt: skip
        assert dotted in ref
    assert "`moe.d_model`" not in ref  # filled from model.d_model


def test_markers_are_required():
    import pytest

    with pytest.raises(ValueError, match="markers"):
        replace_config_reference("no markers here")
    assert README_MARKERS[0] in README.read_text(encoding="utf-8")
