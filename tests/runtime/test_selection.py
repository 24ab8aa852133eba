"""Parsing VLLM_CUSTOM_PATCHES and VLLM_CUSTOM_PATCHES_STRICT."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vllm_custom_patches import PatchConfigError, PatchError
from vllm_custom_patches._core.spec import PATCH_NAME as _NAME
from vllm_custom_patches._runtime.selection import Selection, parse_selection, parse_strict

EMPTY = Selection()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, EMPTY),
        ("", EMPTY),
        ("   ", EMPTY),
        (" , ,", EMPTY),
        ("A", Selection(names=("A",))),
        (" A , B ", Selection(names=("A", "B"))),
        ("B,A", Selection(names=("B", "A"))),
        ("A,B,A", Selection(names=("A", "B"))),
        ("A,,B,", Selection(names=("A", "B"))),
        ("\tA\n,B", Selection(names=("A", "B"))),
        ("pkg.sub_name,_private,x9", Selection(names=("pkg.sub_name", "_private", "x9"))),
        ("*", Selection(all=True)),
        (" * ", Selection(all=True)),
        ("*,-B", Selection(all=True, excluded=frozenset({"B"}))),
        ("*, - B ,-B", Selection(all=True, excluded=frozenset({"B"}))),
        ("-B,*", Selection(all=True, excluded=frozenset({"B"}))),
        ("A,*", Selection(all=True, names=("A",))),
        ("*,A,-B,C", Selection(all=True, names=("A", "C"), excluded=frozenset({"B"}))),
    ],
)
def test_valid_values(value: str | None, expected: Selection) -> None:
    assert parse_selection(value) == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*,*", "'*' appears more than once"),
        (" * , *,A", "'*' appears more than once"),
        ("-B", "'*' is not in the list"),
        ("A,-B", "'*' is not in the list"),
        ("*,A,-A", "'A' is both selected and excluded"),
        ("a b", "'a b' is not a patch name"),
        ("1abc", "'1abc' is not a patch name"),
        ("-", "'-' is not a patch name"),
        ("-*", "'-*' is not a patch name"),
        ("*,--B", "'--B' is not a patch name"),
        ("A;B", "'A;B' is not a patch name"),
        ("péché", "'péché' is not a patch name"),
    ],
)
def test_invalid_values_name_the_variable_the_value_and_the_fix(value: str, says: str) -> None:
    with pytest.raises(PatchConfigError) as info:
        parse_selection(value)
    message = str(info.value)
    assert message.startswith(f"VLLM_CUSTOM_PATCHES={value!r}: ")
    assert says in message
    assert "write" in message or "keep one" in message  # every message says how to fix it


def test_selection_helpers() -> None:
    selection = parse_selection("*,A,-B")
    assert not selection.empty
    assert parse_selection(" ").empty
    assert selection.is_explicit("A")
    assert not selection.is_explicit("B")
    assert not selection.is_explicit("C")
    assert str(selection) == "*,A,-B"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, True),
        ("", True),
        ("  ", True),
        ("1", True),
        (" TRUE ", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        (" No", False),
        ("OFF\n", False),
    ],
)
def test_strict_values(value: str | None, expected: bool) -> None:
    assert parse_strict(value) is expected


@pytest.mark.parametrize("value", ["2", "maybe", "tru", "1.0", "-1", "enabled"])
def test_bad_strict_values(value: str) -> None:
    with pytest.raises(PatchConfigError, match=r"VLLM_CUSTOM_PATCHES_STRICT=.* is not a boolean\. Set it to 1"):
        parse_strict(value)


# -- properties ---------------------------------------------------------------

_ALPHABET = st.sampled_from([*" ,*-_.\t\n", "a", "B", "z", "1", "é", ";", "/", "A"])
names = st.from_regex(_NAME, fullmatch=True).filter(lambda s: len(s) < 30)
blank = st.sampled_from(["", " ", "\t", "  ", "\n"])


@given(st.one_of(st.text(), st.text(alphabet=_ALPHABET, max_size=40)))
@example("*,-")
@example("*,- ")
@example(",-,")
def test_any_string_parses_or_raises_config_error(value: str) -> None:
    try:
        selection = parse_selection(value)
    except PatchConfigError as exc:
        assert isinstance(exc, PatchError) and isinstance(exc, ValueError)
        assert "VLLM_CUSTOM_PATCHES=" in str(exc)
        return
    # Whatever parses is well-formed.
    assert all(_NAME.fullmatch(name) for name in (*selection.names, *selection.excluded))
    assert len(set(selection.names)) == len(selection.names)
    assert not set(selection.names) & selection.excluded
    assert selection.all or not selection.excluded
    assert selection.empty == (not value.replace(",", "").strip())


@given(st.lists(names, max_size=8), st.lists(blank, min_size=16, max_size=16))
def test_listed_names_come_back_in_order_without_duplicates(listed: list[str], pads: list[str]) -> None:
    value = ",".join(f"{pads[i % 16]}{name}{pads[(i + 3) % 16]}" for i, name in enumerate(listed))
    assert parse_selection(value) == Selection(names=tuple(dict.fromkeys(listed)))


@given(st.lists(names, max_size=5), st.lists(names, max_size=5))
def test_star_with_exclusions(listed: list[str], excluded: list[str]) -> None:
    excluded = [name for name in excluded if name not in listed]
    value = ",".join([*listed, "*", *("-" + name for name in excluded)])
    selection = parse_selection(value)
    assert selection == Selection(all=True, names=tuple(dict.fromkeys(listed)), excluded=frozenset(excluded))
    assert parse_selection(str(selection)) == selection


@given(st.text())
def test_strict_parses_or_raises_config_error(value: str) -> None:
    try:
        result = parse_strict(value)
    except PatchConfigError as exc:
        assert "VLLM_CUSTOM_PATCHES_STRICT" in str(exc)
    else:
        assert result is (value.strip().lower() not in {"0", "false", "no", "off"})
