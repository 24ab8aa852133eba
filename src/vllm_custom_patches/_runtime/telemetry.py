"""Per-patch telemetry (``VLLM_CUSTOM_PATCHES_TELEMETRY=1``): what each grafted member costs, in each process.

For every member of every patch applied while telemetry is on, this process
counts:

* ``calls``;
* ``total_s``: seconds from entering the member to leaving it;
* ``own_s``: the same minus the time spent in what it calls *through the
  framework*: the original it reaches (``self._original_<name>``,
  ``P.original("<name>")``), the next layer of a stack, and any other timed
  member (another patch's, or one of its own).  So in a stack, an outer
  layer's own time excludes the layers inward of it and vLLM's original; what
  the patch calls in other ways (vLLM's helper functions, methods of ``self``
  that no patch replaces) is its own time;
* ``errors``, and the last one's type and message: exceptions raised by the
  patch's code that left the member.  An exception that only passes through
  it, raised by the original or an inner layer, is theirs and is not counted.
  Each error is logged as one line in vLLM's log naming the patch, at most one
  line per member every :data:`LOG_INTERVAL_S` seconds (the next line says how
  many were not logged), so a failing hot path cannot flood the log.

How.  The core's instrument hook (``_core.instrument``): while telemetry is on,
apply grafts a timing function around each of the patch's functions instead of
the function itself (a ``staticmethod``/``classmethod`` of it, or a
``property`` whose accessors are timed: one row per property, reads, writes and
deletes together), and keeps as the original a thin timing shim around vLLM's
original, which marks what the patch spends there as not its own.  Both take
exactly the parameters of the function they stand for (generated from its
code, defaults shared), so a call costs two clock reads and a few attribute
updates more, nothing else.  Each thread keeps one child-time accumulator:
every timed call saves it, starts it at zero, and on the way out reads what
its callees added (its child time) and adds its own duration to what it
saved; a shim adds its duration to the saved value, dropping what timed calls
inside the original added.  So own time is never negative and never above the
total, under re-entrancy and recursion too (a member that calls itself counts
each call, and the outer call's total includes the inner one, as a profiler's
cumulative time does).  Counters are kept per thread and summed when read: no
lock on the hot path, no lost update.

Not timed, left exactly as the patch wrote them: generator and coroutine
functions (their calls return at once; what they cost is spent when they are
iterated or awaited, elsewhere), ``functools.cached_property``, other
descriptors and plain values.  Off (the default), nothing of this module is
imported and apply grafts exactly what it always did.  Turning telemetry on
or off changes only the patches applied afterwards; the counters of a patch
rolled back stay (applied again, it counts on), so every figure only grows for
the life of the process.  A forked child starts from zero.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any, Final

from .._core.forksafe import ForkSafeLock
from .._core.instrument import install, installed
from .._core.log import logger

__all__ = ["LOG_INTERVAL_S", "MemberStats", "Telemetry", "disable", "enable", "enabled", "rows"]

LOG_INTERVAL_S: Final = 60.0
"""At most one log line per member for its errors within this many seconds."""

_CO_VARARGS: Final = 0x04
_CO_VARKEYWORDS: Final = 0x08
_NOT_TIMED_FLAGS: Final = 0x20 | 0x80 | 0x100 | 0x200
"""CO_GENERATOR, CO_COROUTINE, CO_ITERABLE_COROUTINE, CO_ASYNC_GENERATOR."""

Clock = Callable[[], int]


class _ThreadState:
    """One thread's telemetry: its child-time accumulator, the exception passing through, its counters."""

    __slots__ = ("cells", "child", "passing")

    def __init__(self) -> None:
        self.child = 0
        """Nanoseconds the timed calls and originals that the running timed call made have taken so far."""
        self.passing: BaseException | None = None
        """An exception that left a timed callee and is passing through its caller: not the caller's own error."""
        self.cells: dict[MemberStats, list[int]] = {}
        """Per member: ``[calls, total_ns, child_ns]`` of this thread."""


_local = threading.local()


def _thread_state() -> _ThreadState:
    state = _local.state = _ThreadState()
    return state


class MemberStats:
    """The counters of one member of one patch in this process.

    Each thread that calls it has a cell ``[calls, total_ns, child_ns]`` that
    only it adds to (own time is total minus child time); readers sum the
    cells, and fold those of finished threads into ``retired``.  Errors are
    rare and counted under a lock.
    """

    __slots__ = (
        "_lock", "cells", "errors", "last_error", "log_after", "member", "not_logged", "patch", "retired", "target",
    )  # fmt: skip

    def __init__(self, patch: str, target: str, member: str) -> None:
        self.patch = patch
        self.target = target
        self.member = member
        self.cells: list[tuple[weakref.ref[threading.Thread], list[int]]] = []
        self.retired = [0, 0, 0]
        self.errors = 0
        self.last_error: str | None = None
        self.log_after = float("-inf")
        self.not_logged = 0
        self._lock = ForkSafeLock()

    def new_cell(self, state: _ThreadState) -> list[int]:
        """The calling thread's cell, made on its first call."""
        cell = state.cells[self] = [0, 0, 0]
        with self._lock:
            self.cells.append((weakref.ref(threading.current_thread()), cell))
        return cell

    def totals(self) -> tuple[int, int, int]:
        """``(calls, total_ns, own_ns)`` over every thread."""
        with self._lock:
            live = []
            calls, total, child = self.retired
            for thread, cell in self.cells:
                # Child first: a writer adds total before child, so what is read keeps own >= 0.
                child += cell[2]
                calls += cell[0]
                total += cell[1]
                alive = thread()
                if alive is not None and alive.is_alive():
                    live.append((thread, cell))
                else:  # it will never add to its cell again
                    self.retired = [self.retired[0] + cell[0], self.retired[1] + cell[1], self.retired[2] + cell[2]]
            self.cells = live
        return calls, total, total - child

    def row(self) -> dict[str, Any]:
        calls, total, own = self.totals()
        return {
            "patch": self.patch,
            "member": self.member,
            "calls": calls,
            "own_s": own / 1e9,
            "total_s": total / 1e9,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def failed(self, exc: BaseException, clock: Callable[[], float], interval: float) -> None:
        """Count an error of the patch's code; log it unless a line for this member was logged lately."""
        text = _describe(exc)
        with self._lock:
            self.errors += 1
            self.last_error = text
            count = self.errors
            now = clock()
            if now < self.log_after:
                self.not_logged += 1
                return
            self.log_after = now + interval
            not_logged, self.not_logged = self.not_logged, 0
        more = f"; {not_logged} more not logged since the last line" if not_logged else ""
        logger.warning(
            "vllm-custom-patches [pid %d]: patch %r raised in %s.%s: %s (error %d of this member%s; "
            "at most one line per %g s)",
            os.getpid(),
            self.patch,
            self.target,
            self.member,
            text,
            count,
            more,
            interval,
        )

    def reset(self) -> None:
        with self._lock:
            for _, cell in self.cells:
                cell[:] = [0, 0, 0]
            self.retired = [0, 0, 0]
            self.errors = 0
            self.last_error = None
            self.log_after = float("-inf")
            self.not_logged = 0


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the error it describes
        message = "<message unavailable>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    text = " ".join(text.split())  # one line in the log and in the status
    return text if len(text) <= 500 else text[:497] + "..."


class Telemetry:
    """The instrument (``_core.instrument.Instrument``) that times patches; its counters by patch and member.

    ``clock`` gives nanoseconds (``time.perf_counter_ns``; a test passes a
    controllable one); ``log_clock`` seconds, for the rate limit of the error
    lines.
    """

    def __init__(
        self,
        clock: Clock = time.perf_counter_ns,
        *,
        log_interval_s: float = LOG_INTERVAL_S,
        log_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.log_interval_s = log_interval_s
        self.log_clock = log_clock
        self._stats: dict[tuple[str, str], MemberStats] = {}
        self._lock = ForkSafeLock()

    # -- the instrument ----------------------------------------------------------------

    def member(self, patch: str, target: type, name: str, value: object) -> object:
        def timed(func: types.FunctionType) -> types.FunctionType:
            # Made for what is timed only: a member left as it is has no row.
            stats = self.stats(patch, target.__qualname__, name)

            def error(exc: BaseException) -> None:
                stats.failed(exc, self.log_clock, self.log_interval_s)

            return _generate(_TIMED, func, (func, self.clock, _local, _thread_state, stats, stats.new_cell, error))

        return _stand_in(value, timed, f"{patch}.{name}")

    def original(self, target: type, name: str, value: object) -> object:
        def reached(func: types.FunctionType) -> types.FunctionType:
            return _generate(_REACHED, func, (func, self.clock, _local, _thread_state))

        return _stand_in(value, reached, f"{target.__qualname__}._original_{name}")

    # -- the counters ----------------------------------------------------------------

    def stats(self, patch: str, target: str, member: str) -> MemberStats:
        """The counters of ``patch``'s ``member`` (made on first use, kept for the life of the process)."""
        with self._lock:
            stats = self._stats.get((patch, member))
            if stats is None:
                stats = self._stats[(patch, member)] = MemberStats(patch, target, member)
            return stats

    def rows(self) -> list[dict[str, Any]]:
        """Every member timed so far: ``{patch, member, calls, own_s, total_s, errors, last_error}``, sorted."""
        with self._lock:
            stats = sorted(self._stats.values(), key=lambda s: (s.patch, s.member))
        return [each.row() for each in stats]

    def reset(self) -> None:
        """Every counter back to zero (a forked child's: it counts for itself)."""
        with self._lock:
            for stats in self._stats.values():
                stats.reset()


# -- the stand-ins ------------------------------------------------------------------------
#
# Generated with the exact parameters of the function they stand for: a
# ``*args, **kwargs`` forwarder costs a tuple and a dict per call, about as
# much as the rest of the bookkeeping.  Every name of their own starts with
# ``_vcp_``; a function with such a parameter, or one named after a builtin
# they use, gets the ``*args, **kwargs`` form.

_TIMED: Final = """
def _vcp_factory(_vcp_func, _vcp_clock, _vcp_local, _vcp_new_state, _vcp_key, _vcp_new_cell, _vcp_error):
    def _vcp_stand_in({params}):
        try:
            _vcp_state = _vcp_local.state
        except AttributeError:
            _vcp_state = _vcp_new_state()
        _vcp_saved = _vcp_state.child
        _vcp_state.child = 0
        _vcp_start = _vcp_clock()
        try:
            _vcp_result = _vcp_func({args})
        except BaseException as _vcp_exc:
            if _vcp_exc is not _vcp_state.passing and isinstance(_vcp_exc, Exception):
                try:
                    _vcp_error(_vcp_exc)
                except Exception:  # counting must never replace the patch's exception
                    pass
            _vcp_state.passing = _vcp_exc
            raise
        else:
            _vcp_state.passing = None
        finally:
            _vcp_elapsed = _vcp_clock() - _vcp_start
            _vcp_child = _vcp_state.child
            _vcp_state.child = _vcp_saved + _vcp_elapsed
            _vcp_cell = _vcp_state.cells.get(_vcp_key)
            if _vcp_cell is None:
                _vcp_cell = _vcp_new_cell(_vcp_state)
            _vcp_cell[0] += 1
            _vcp_cell[1] += _vcp_elapsed
            _vcp_cell[2] += _vcp_child
        return _vcp_result
    return _vcp_stand_in
"""

_REACHED: Final = """
def _vcp_factory(_vcp_func, _vcp_clock, _vcp_local, _vcp_new_state):
    def _vcp_stand_in({params}):
        try:
            _vcp_state = _vcp_local.state
        except AttributeError:
            _vcp_state = _vcp_new_state()
        _vcp_saved = _vcp_state.child
        _vcp_start = _vcp_clock()
        try:
            _vcp_result = _vcp_func({args})
        except BaseException as _vcp_exc:
            _vcp_state.passing = _vcp_exc
            raise
        finally:
            # Its caller's child time; what timed calls inside the original added is dropped (counted in this).
            _vcp_state.child = _vcp_saved + (_vcp_clock() - _vcp_start)
        return _vcp_result
    return _vcp_stand_in
"""

_TEMPLATE_GLOBALS: Final = frozenset({"AttributeError", "BaseException", "Exception", "isinstance"})
"""Builtins the templates use: a parameter of that name would hide them."""
_factories: dict[tuple[str, str, str], Callable[..., types.FunctionType]] = {}
_factories_lock = ForkSafeLock()


def _parameters(code: types.CodeType) -> tuple[str, str]:
    """``(parameter list, argument list)`` that pass every argument of a call on, as the code declares them."""
    names = code.co_varnames
    positional = list(names[: code.co_argcount])
    keyword = list(names[code.co_argcount : code.co_argcount + code.co_kwonlyargcount])
    index = code.co_argcount + code.co_kwonlyargcount
    varargs = names[index] if code.co_flags & _CO_VARARGS else None
    index += 1 if varargs else 0
    varkw = names[index] if code.co_flags & _CO_VARKEYWORDS else None
    declared = [*positional, *keyword, *(name for name in (varargs, varkw) if name is not None)]
    if any(name.startswith("_vcp_") or name in _TEMPLATE_GLOBALS or not name.isidentifier() for name in declared):
        return "*_vcp_args, **_vcp_kwargs", "*_vcp_args, **_vcp_kwargs"
    params = list(positional)
    if code.co_posonlyargcount:
        params.insert(code.co_posonlyargcount, "/")
    if varargs:
        params.append("*" + varargs)
    elif keyword:
        params.append("*")
    params += keyword
    if varkw:
        params.append("**" + varkw)
    args = [*positional, *(["*" + varargs] if varargs else []), *(f"{k}={k}" for k in keyword)]
    args += ["**" + varkw] if varkw else []
    return ", ".join(params), ", ".join(args)


def _generate(template: str, func: types.FunctionType, closure: tuple[Any, ...]) -> types.FunctionType:
    params, args = _parameters(func.__code__)
    key = (template, params, args)
    with _factories_lock:
        factory = _factories.get(key)
        if factory is None:
            namespace: dict[str, Any] = {}
            exec(
                compile(template.format(params=params, args=args), "<vllm-custom-patches telemetry>", "exec"), namespace
            )
            factory = _factories[key] = namespace["_vcp_factory"]
    stand_in = factory(*closure)
    # What the caller's defaults would have given: the very same objects.
    stand_in.__defaults__ = func.__defaults__
    stand_in.__kwdefaults__ = dict(func.__kwdefaults__) if func.__kwdefaults__ else None
    return stand_in


def _stand_in(value: object, make: Callable[[types.FunctionType], types.FunctionType], label: str) -> object:
    """``value`` with each of its plain functions replaced by ``make(function)``, of the same kind; else ``value``."""
    if isinstance(value, types.FunctionType):
        return _function(value, make, label) if _timeable(value) else value
    if type(value) in (staticmethod, classmethod):
        func = value.__func__  # type: ignore[attr-defined]
        if not (isinstance(func, types.FunctionType) and _timeable(func)):
            return value
        new = type(value)(_function(func, make, label))  # type: ignore[call-arg]
        with contextlib.suppress(TypeError):  # what a decorator put on the wrapper (a mark) stays
            vars(new).update(vars(value))
        return new
    if type(value) is property:
        accessors = [
            _function(f, make, f"{label}.{role}") if isinstance(f, types.FunctionType) and _timeable(f) else f
            for f, role in ((value.fget, "fget"), (value.fset, "fset"), (value.fdel, "fdel"))
        ]
        if all(new is old for new, old in zip(accessors, (value.fget, value.fset, value.fdel), strict=True)):
            return value
        return property(*accessors, value.__doc__)  # type: ignore[arg-type,call-arg]
    return value


def _timeable(func: types.FunctionType) -> bool:
    return not func.__code__.co_flags & _NOT_TIMED_FLAGS


def _function(
    func: types.FunctionType, make: Callable[[types.FunctionType], types.FunctionType], label: str
) -> types.FunctionType:
    """``make(func)``, looking like ``func`` (name, docstring, attributes, ``__wrapped__``) to introspection."""
    stand_in = make(func)
    # A code object of its own, named after what it times: the core tells a rolled-back patch's
    # running calls by their code (``inflight``), and code objects compare by value.
    stand_in.__code__ = stand_in.__code__.replace(co_name=func.__name__, co_qualname=f"<telemetry of {label}>")
    functools.update_wrapper(stand_in, func)
    return stand_in


# -- the process's telemetry ----------------------------------------------------------------

_telemetry: Telemetry | None = None
_enable_lock = ForkSafeLock()


def enable(telemetry: Telemetry | None = None) -> Telemetry:
    """Time the patches applied from now on in this process; returns the telemetry (the same one if already on)."""
    global _telemetry
    with _enable_lock:
        if telemetry is not None:
            _telemetry = telemetry
        elif _telemetry is None:
            _telemetry = Telemetry()
        install(_telemetry)
        return _telemetry


def disable() -> None:
    """Apply patches untimed from now on; those applied meanwhile stay timed (their rows stay too)."""
    with _enable_lock:
        if installed() is _telemetry:
            install(None)


def enabled() -> bool:
    """Whether the patches applied now are timed."""
    return _telemetry is not None and installed() is _telemetry


def rows() -> list[dict[str, Any]]:
    """Every member timed in this process so far (empty if telemetry was never on)."""
    telemetry = _telemetry
    return telemetry.rows() if telemetry is not None else []


def _reset_for_tests() -> None:
    """Telemetry off and forgotten (members applied meanwhile keep counting, into counters no longer read)."""
    global _telemetry
    with _enable_lock:
        if installed() is _telemetry:
            install(None)
        _telemetry = None


def _after_fork_in_child() -> None:
    # Counters are per process: a forked child does not inherit its parent's calls.  The forking
    # thread's accumulator stays: its calls go on, and return, in the child too.
    if _telemetry is not None:
        _telemetry.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
