"""Signature compatibility of an override with its original (``_signatures``)."""

from __future__ import annotations

import ast
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_custom_patches._upgrade.signatures import (
    describe,
    gained_parameters,
    incompatibilities,
    signature_from_ast,
)

P = inspect.Parameter


def compile_def(source: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # the tests' own source strings only
    func: Callable[..., Any] = namespace["f"]
    return func


def sig(params: str) -> inspect.Signature:
    return inspect.signature(compile_def(f"def f({params}): pass"))


def check(original: str, override: str) -> list[str]:
    return incompatibilities(sig(original), sig(override))


# -- concrete, vLLM-like cases ------------------------------------------------


def test_dropped_optional_parameter_is_one_message_naming_it() -> None:
    problems = check("self, throttle_prefills=False", "self")
    assert problems == [
        "the original accepts 'throttle_prefills' (keyword or positional, optional, default False);"
        " the override has no such parameter, no *args and no **kwargs"
    ]


def test_identical_signatures_are_compatible() -> None:
    assert check("self, scheduler_output, *, budget=None", "self, scheduler_output, *, budget=None") == []


@pytest.mark.parametrize(
    "original",
    ["self", "self, x, y=1, *rest, z, **kw", "self, throttle_prefills=False", "self, **kw", "self, *a"],
)
def test_pass_through_override_accepts_everything(original: str) -> None:
    assert check(original, "self, *args, **kwargs") == []
    assert check(original, "*args, **kwargs") == []


def test_pass_through_keeping_self_can_still_clash() -> None:
    # The original's **kw takes 'self' by keyword (its own self is positional-only):
    # f(obj, 1, self=2) binds there, but gives the override's 'self' twice.
    (problem,) = check("self, x, /, **kw", "self, *args, **kwargs")
    assert "(**kw)" in problem and "'self' at position 1" in problem and "twice" in problem
    assert check("self, x, /, **kw", "*args, **kwargs") == []


def test_renamed_positional_parameter() -> None:
    problems = check("self, request", "self, req")
    assert any("'request'" in p and "renamed it to 'req'" in p for p in problems)
    assert any("requires 'req'" in p for p in problems)


def test_swapped_parameters() -> None:
    problems = check("self, a, b", "self, b, a")
    assert any("'b'" in p and "at position 2 (was 3)" in p and "twice" in p for p in problems)
    moved = "requires it at position 3, while the original takes it at position 2"
    assert any("'a'" in p and moved in p for p in problems)


def test_a_renamed_parameter_is_harmless_when_both_names_are_optional() -> None:
    # f(1) and f(x=1) both bind on the override; the rules judge calls, not names.
    assert check("x", "y=0, x=0") == []


def test_positional_names_do_not_matter_when_positional_only() -> None:
    assert check("self, request, /", "self, req, /") == []


def test_keyword_only_in_override_refuses_positional_call() -> None:
    (problem,) = check("self, budget=None", "self, *, budget=None")
    assert "'budget'" in problem and "takes at most 1 positional argument and no *args" in problem


def test_keyword_only_in_original_may_become_positional_or_keyword() -> None:
    assert check("self, *, budget=None", "self, budget=None") == []
    assert check("self, *, budget", "self, *, budget=4") == []


def test_override_adding_required_parameter() -> None:
    (problem,) = check("self", "self, extra")
    assert "requires 'extra'" in problem and "omit it" in problem
    assert check("self", "self, extra=None") == []
    assert check("self", "self, *, extra=None") == []


def test_optional_made_required() -> None:
    (problem,) = check("self, x=1", "self, x")
    assert "'x'" in problem and "default 1" in problem and "requires it" in problem


def test_original_kwargs_need_override_kwargs() -> None:
    (problem,) = check("self, **kwargs", "self")
    assert "arbitrary keyword arguments (**kwargs)" in problem and "has no **kwargs" in problem


def test_original_args_need_override_args() -> None:
    (problem,) = check("self, *args", "self, a=None")
    assert "any number of positional arguments (*args)" in problem


def test_positional_only_override_refuses_keyword() -> None:
    (problem,) = check("x", "x, /")
    assert problem == (
        "the original accepts 'x' (keyword or positional, required); the override has 'x' only as"
        " positional-only and no **kwargs, and requires it at position 1"
    )


def test_keyword_after_positionals_given_twice() -> None:
    (problem,) = check("a, b=0, *, x", "a, x, b=0")
    assert "'x'" in problem and "at position 2" in problem and "twice" in problem


# -- gained_parameters, signature_from_ast, describe ---------------------------


def test_gained_parameters() -> None:
    assert gained_parameters(sig("self"), sig("self, throttle_prefills=False")) == ["throttle_prefills"]
    assert gained_parameters(sig("self, a, b"), sig("self, b, *, c, **kw")) == ["c", "kw"]
    assert gained_parameters(sig("self, a"), sig("self")) == []


SOURCES = [
    "def f(): pass",
    "def f(self): pass",
    "def f(self, throttle_prefills: bool = False) -> None: pass",
    "def f(a, b=1, /, c=2, *, d, e=3, **k): pass",
    "def f(a=0, /, b=1, *args, c, **kwargs): pass",
    "def f(a, /, *, b): pass",
    "def f(*args, **kwargs): pass",
    "def f(a, b, /, c, d=[1, 2], *rest): pass",
    "async def f(self, x: int, *, y: 'str' = 'a', z): pass",
    "@staticmethod\ndef f(x, y={'k': (1, 2)}): pass",
]


def shape(signature: inspect.Signature) -> list[tuple[str, Any, bool]]:
    return [(p.name, p.kind, p.default is P.empty) for p in signature.parameters.values()]


@pytest.mark.parametrize("source", SOURCES)
def test_signature_from_ast_matches_inspect(source: str) -> None:
    node = ast.parse(source).body[0]
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    func = compile_def(source)
    real = inspect.signature(func.__func__ if isinstance(func, staticmethod) else func)
    read = signature_from_ast(node)
    assert shape(read) == shape(real)
    assert describe(read) == describe(real)


def test_defaults_read_from_source_show_their_text() -> None:
    node = ast.parse("def f(x=[1, 2], *, y=SOME.CONSTANT + 1): pass").body[0]
    assert isinstance(node, ast.FunctionDef)
    assert describe(signature_from_ast(node)) == "(x=[1, 2], *, y=SOME.CONSTANT + 1)"


def test_describe_drops_annotations() -> None:
    assert describe(sig("self, throttle_prefills: bool = False")) == "(self, throttle_prefills=False)"
    assert describe(sig("self, *args: int, **kwargs: str")) == "(self, *args, **kwargs)"


# -- the rules are exact: property tests against real calls ---------------------
#
# The oracle is calling the function, not ``Signature.bind``: on Python 3.11
# ``bind`` rejects ``f(a=1)`` for ``def f(a=0, /, **kw)``, which Python accepts.

NAMES = "abcz"  # z: a name no generated signature has, for **kwargs
KINDS = [P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY]
Call = tuple[int, frozenset[str]]


@st.composite
def sources(draw: st.DrawFn) -> str:
    """``def f(...)`` with up to three of a/b/c, of any kinds, and maybe *args/**kwargs."""
    names = draw(st.permutations("abc"))[: draw(st.integers(0, 3))]
    drawn: list[tuple[Any, str, bool]] = [(draw(st.sampled_from(KINDS)), n, draw(st.booleans())) for n in names]
    if draw(st.booleans()):
        drawn.append((P.VAR_POSITIONAL, "args", False))
    if draw(st.booleans()):
        drawn.append((P.VAR_KEYWORD, "kwargs", False))
    params, default_seen = [], False
    for kind, name, drawn_default in sorted(drawn, key=lambda p: p[0]):
        has_default = drawn_default
        if kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):  # positional defaults are trailing
            default_seen = has_default = default_seen or drawn_default
        params.append(P(name, kind, default=0 if has_default else P.empty))
    return f"def f{inspect.Signature(params)}: pass"


def accepts(func: Callable[..., Any], call: Call) -> bool:
    n, keywords = call
    try:
        func(*range(n), **dict.fromkeys(keywords, 0))
    except TypeError:
        return False
    return True


ALL_CALLS: list[Call] = [
    (n, frozenset(keys)) for n in range(6) for r in range(5) for keys in itertools.combinations(NAMES, r)
]


@settings(max_examples=300, deadline=None)
@given(sources(), sources(), st.lists(st.tuples(st.integers(0, 5), st.frozensets(st.sampled_from(NAMES)))))
def test_no_problems_means_every_accepted_call_binds(original: str, override: str, calls: list[Call]) -> None:
    orig, over = compile_def(original), compile_def(override)
    problems = incompatibilities(inspect.signature(orig), inspect.signature(over))
    failing = [c for c in calls if accepts(orig, c) and not accepts(over, c)]
    if not problems:
        assert failing == []
    if failing:
        assert problems


@settings(max_examples=300, deadline=None)
@given(sources(), sources())
def test_problems_exactly_when_some_accepted_call_fails(original: str, override: str) -> None:
    orig, over = compile_def(original), compile_def(override)
    problems = incompatibilities(inspect.signature(orig), inspect.signature(over))
    failing = [c for c in ALL_CALLS if accepts(orig, c) and not accepts(over, c)]
    assert bool(problems) == bool(failing), (problems, failing[:5])
    assert all(p.startswith(("the original accepts ", "the override requires ")) for p in problems)
