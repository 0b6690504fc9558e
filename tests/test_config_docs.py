"""Every config field is described: in help(StabilizerConfig) and in SPEC.md's table."""

import dataclasses
import pathlib
import pydoc
import re

import pytest

from optax_gradflow.config import FIELD_DOCS, StabilizerConfig, field_descriptions

SPEC = pathlib.Path(__file__).resolve().parents[1] / "SPEC.md"
FIELDS = [f.name for f in dataclasses.fields(StabilizerConfig)]


def spec_table() -> dict[str, tuple[str, str, str]]:
    """field -> (default, meaning, valid) of SPEC.md's "Hyperparameters" table."""
    text = SPEC.read_text(encoding="utf-8")
    table = text[text.index("| field | default | meaning | valid |") :]
    rows = {}
    for line in table.split("\n\n", 1)[0].splitlines()[2:]:
        name, default, meaning, valid = (c.strip() for c in line.strip().strip("|").split(" | "))
        rows[name.strip("`")] = (default, meaning, valid)
    return rows


def _spec_default(text: str):
    words = {"None": None, "true": True, "false": False}
    if text in words:
        return words[text]
    if text.startswith('`"'):
        return text.strip('`"')
    return float(text)


def test_every_field_has_a_description():
    assert FIELDS, "no fields found"
    assert sorted(FIELD_DOCS) == sorted(FIELDS)
    for name, doc in FIELD_DOCS.items():
        assert all(doc), name


@pytest.mark.parametrize("name", FIELDS)
def test_help_describes_each_field(name):
    text = pydoc.render_doc(StabilizerConfig, renderer=pydoc.plaintext)
    doc = FIELD_DOCS[name]
    default = dataclasses.fields(StabilizerConfig)[FIELDS.index(name)].default
    lines = [line.strip(" |") for line in text.splitlines()]
    line = next((line for line in lines if line.startswith(f"{name}: ")), None)
    assert line is not None, f"help(StabilizerConfig) does not describe {name}"
    assert doc.meaning in line and f"Unit: {doc.unit}." in line
    assert f"Default: {default!r}." in line and f"Valid: {doc.valid}." in line
    assert f'SPEC.md, "{doc.section}"' in line


def test_the_table_is_spec_word_for_word():
    rows = spec_table()
    assert sorted(rows) == sorted(FIELDS)
    for field in dataclasses.fields(StabilizerConfig):
        default, meaning, valid = rows[field.name]
        assert _spec_default(default) == field.default, field.name
        assert FIELD_DOCS[field.name].meaning == meaning, field.name
        assert FIELD_DOCS[field.name].valid == valid, field.name


def test_each_section_exists_in_spec():
    headings = set(re.findall(r"^#+ (.+)$", SPEC.read_text(encoding="utf-8"), flags=re.M))
    for name, doc in FIELD_DOCS.items():
        assert doc.section in headings, (name, doc.section)


def test_an_undescribed_field_is_visible(monkeypatch):
    # A field added without a description says so in help() (and the first
    # test above fails), rather than breaking the import.
    monkeypatch.delitem(FIELD_DOCS, "track_k")
    assert "track_k: (not described yet)." in field_descriptions()
