"""Whether an override accepts every call its original accepts.

A patch replaces a vLLM method (the *original*) with its own function (the
*override*).  vLLM goes on calling it with the arguments the original takes,
so an override that rejects one of those calls breaks vLLM at run time, often
only on a rarely taken path.  This module decides that from the two
signatures alone and says what is wrong, naming the parameter.

The check is exact: :func:`incompatibilities` is empty if and only if every
call the original accepts binds on the override.  A call is how many arguments
it passes positionally (``n``) plus the names it passes by keyword.  For each
``n`` the original takes, the override must take ``n`` positionals, take every
name the original takes by keyword after ``n`` positionals, and require nothing
the original lets such a call omit.  Past both positional lists every ``n``
behaves alike, so a short loop covers all calls.  Annotations and default
values are not compared: a default changes behaviour, not whether a call binds.

Calls follow the interpreter, not ``inspect.Signature.bind``: with ``**kwargs``
a positional-only parameter's name may be passed by keyword (into ``**kwargs``),
which ``bind`` on Python 3.11 rejects.
"""

from __future__ import annotations

import ast
import inspect

__all__ = ["describe", "gained_parameters", "incompatibilities", "signature_from_ast"]

_P = inspect.Parameter
_KINDS: dict[inspect._ParameterKind, str] = {
    _P.POSITIONAL_ONLY: "positional-only",
    _P.POSITIONAL_OR_KEYWORD: "keyword or positional",
    _P.KEYWORD_ONLY: "keyword-only",
}
_NO_NAME_KW = "has no such parameter and no **kwargs"
_NO_NAME_POS = "has no such parameter and no *args"


class _Shape:
    """One signature, arranged for the questions a call asks of it."""

    def __init__(self, signature: inspect.Signature) -> None:
        params = list(signature.parameters.values())
        positional_kinds = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
        self.positional = [p for p in params if p.kind in positional_kinds]
        self.keyword_only = [p for p in params if p.kind is _P.KEYWORD_ONLY]
        self.var_positional = next((p for p in params if p.kind is _P.VAR_POSITIONAL), None)
        self.var_keyword = next((p for p in params if p.kind is _P.VAR_KEYWORD), None)
        self.by_name = {p.name: p for p in params if p.kind in _KINDS}
        self.index = {p.name: i for i, p in enumerate(self.positional)}
        # Positional defaults are trailing, so the required positional-only
        # parameters come first: fewer positional arguments than that fail.
        self.min_positional = sum(p.kind is _P.POSITIONAL_ONLY and p.default is _P.empty for p in params)

    def takes_positional(self, n: int) -> bool:
        return n <= len(self.positional) or self.var_positional is not None

    def takes_keyword(self, name: str, n: int) -> bool:
        """Whether ``name=`` binds after ``n`` positional arguments."""
        param = self.by_name.get(name)
        if param is not None and param.kind is _P.POSITIONAL_OR_KEYWORD:
            # Already filled positionally: "multiple values", **kwargs or not.
            return self.index[name] >= n
        if param is not None and param.kind is _P.KEYWORD_ONLY:
            return True
        # Unknown and positional-only names can only land in **kwargs.
        return self.var_keyword is not None

    def needs_keyword(self, n: int) -> set[str]:
        """Names every call with ``n`` positional arguments must pass by keyword."""
        rest = [p for p in self.positional[n:] if p.kind is _P.POSITIONAL_OR_KEYWORD]
        return {p.name for p in rest + self.keyword_only if p.default is _P.empty}

    def unfilled(self, n: int, keywords: set[str]) -> list[inspect.Parameter]:
        """Required parameters left without a value by ``n`` positionals and ``keywords``."""
        # A keyword never fills a positional-only parameter (it goes to **kwargs, if anywhere).
        return [
            p
            for p in self.positional[n:] + self.keyword_only
            if p.default is _P.empty and (p.kind is _P.POSITIONAL_ONLY or p.name not in keywords)
        ]


def _message(subject: str, clauses: dict[str, str]) -> str:
    parts = list(clauses.values())
    if _NO_NAME_KW in parts and _NO_NAME_POS in parts:  # say "no such parameter" once
        parts.remove(_NO_NAME_POS)
        parts[parts.index(_NO_NAME_KW)] = "has no such parameter, no *args and no **kwargs"
    return f"{subject}; the override {', and '.join(parts)}" if parts else subject


def _about(param: inspect.Parameter) -> str:
    if param.kind is _P.VAR_POSITIONAL:
        return f"any number of positional arguments (*{param.name})"
    if param.kind is _P.VAR_KEYWORD:
        return f"arbitrary keyword arguments (**{param.name})"
    need = "required" if param.default is _P.empty else f"optional, default {param.default!r}"
    return f"'{param.name}' ({_KINDS[param.kind]}, {need})"


def _plural(n: int) -> str:
    return f"{n} positional argument" + ("" if n == 1 else "s")


def incompatibilities(original: inspect.Signature, override: inspect.Signature) -> list[str]:
    """Why some call the original accepts would fail on the override; empty if none.

    Both signatures include ``self``/``cls`` if the caller passes them as such
    (the caller strips or keeps them consistently).
    """
    orig, over = _Shape(original), _Shape(override)
    # Sentence start -> {kind of failure: clause}; the first clause of a kind
    # (the call with fewest positional arguments) stands for the others.
    findings: dict[str, dict[str, str]] = {}

    def about_original(param: inspect.Parameter) -> dict[str, str]:
        return findings.setdefault(f"the original accepts {_about(param)}", {})

    def keyword_clause(name: str, n: int) -> str:
        param = over.by_name.get(name)
        if param is not None and param.kind is _P.POSITIONAL_OR_KEYWORD:
            was = orig.index.get(name)
            where = f"at position {over.index[name] + 1}" + ("" if was is None else f" (was {was + 1})")
            return f"has '{name}' {where}, so passing it by keyword after {_plural(n)} gives it twice"
        if param is not None:
            return f"has '{name}' only as positional-only and no **kwargs"
        # Only positional-or-keyword names reach here with a position (see the caller).
        counterpart = orig.index.get(name, len(over.positional))
        if counterpart < len(over.positional):
            return f"renamed it to '{over.positional[counterpart].name}' and has no **kwargs"
        return _NO_NAME_KW

    # Beyond both positional lists every n behaves like the first one past them.
    last = max(len(orig.positional), len(over.positional)) + 1
    for n in range(orig.min_positional, last + 1):
        if not orig.takes_positional(n):
            break
        if not over.takes_positional(n):
            extra = orig.positional[n - 1] if n <= len(orig.positional) else orig.var_positional
            assert extra is not None  # orig takes n positionals
            absent = extra.kind in _KINDS and extra.name not in over.by_name
            about_original(extra).setdefault(
                "slot",
                _NO_NAME_POS if absent else f"takes at most {_plural(len(over.positional))} and no *args",
            )
        for name in [*orig.by_name, *over.by_name]:
            if orig.takes_keyword(name, n) and not over.takes_keyword(name, n):
                owner = orig.by_name.get(name)
                if owner is not None and owner.kind is not _P.POSITIONAL_ONLY:
                    about_original(owner).setdefault("keyword", keyword_clause(name, n))
                elif name in over.by_name:  # reaches the original through its **kwargs
                    # (a name the override lacks altogether is "has no **kwargs" below)
                    assert orig.var_keyword is not None
                    clause = f"does not take '{name}': it {keyword_clause(name, n)}"
                    about_original(orig.var_keyword).setdefault(f"keyword:{name}", clause)
        if orig.var_keyword is not None and over.var_keyword is None:
            # Any name neither signature spells out: only **kwargs takes it.
            about_original(orig.var_keyword).setdefault("keyword", "has no **kwargs")
        for param in over.unfilled(n, orig.needs_keyword(n)):
            mine = orig.by_name.get(param.name)
            if mine is None:
                kind = _KINDS[param.kind]
                findings.setdefault(
                    f"the override requires '{param.name}' ({kind}), which the original does not have,"
                    " so calls that omit it fail",
                    {},
                )
            elif mine.default is not _P.empty:
                about_original(mine).setdefault("required", "requires it")
            else:  # required in both, but where the original's calls do not put it
                mine_at, theirs_at = orig.index.get(param.name), over.index.get(param.name)
                where = "by keyword" if theirs_at is None else f"at position {theirs_at + 1}"
                if mine_at is not None and mine_at != theirs_at:
                    where += f", while the original takes it at position {mine_at + 1}"
                about_original(mine).setdefault("required", f"requires it {where}")
    return [_message(subject, clauses) for subject, clauses in findings.items()]


def gained_parameters(baseline: inspect.Signature, current: inspect.Signature) -> list[str]:
    """Names of parameters ``current`` has that ``baseline`` did not.

    That is what an upgrade added to the original, in ``current``'s order.
    """
    return [name for name in current.parameters if name not in baseline.parameters]


class _Source:
    """A default read from source: shown as written, never evaluated."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def signature_from_ast(node: ast.FunctionDef | ast.AsyncFunctionDef) -> inspect.Signature:
    """The signature of a function read statically from source (no import).

    Kinds, names and whether each parameter has a default; defaults become
    objects whose repr is their source text, annotations are dropped.  A
    decorated staticmethod or classmethod is read as written: whether the first
    parameter is ``self``/``cls`` is the caller's call.
    """
    a = node.args
    positional = a.posonlyargs + a.args
    # Defaults belong to the last positional parameters.
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params: list[inspect.Parameter] = []

    def add(arg: ast.arg, kind: inspect._ParameterKind, default: ast.expr | None = None) -> None:
        value = _P.empty if default is None else _Source(ast.unparse(default))
        params.append(_P(arg.arg, kind, default=value))

    for i, arg in enumerate(positional):
        add(arg, _P.POSITIONAL_ONLY if i < len(a.posonlyargs) else _P.POSITIONAL_OR_KEYWORD, defaults[i])
    if a.vararg is not None:
        add(a.vararg, _P.VAR_POSITIONAL)
    for arg, kw_default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        add(arg, _P.KEYWORD_ONLY, kw_default)  # None: a required keyword-only parameter
    if a.kwarg is not None:
        add(a.kwarg, _P.VAR_KEYWORD)
    return inspect.Signature(params)


def describe(signature: inspect.Signature) -> str:
    """``(self, throttle_prefills=False)``-style text for tables: no annotations."""
    bare = [p.replace(annotation=_P.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))
