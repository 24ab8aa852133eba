"""What the plugin does once ``VLLM_CUSTOM_PATCHES`` is set: select, load, apply, report.

The error policy in one place:

* a patch named *explicitly* that cannot be applied is a failure;
* a patch taken in by ``*`` that cannot be applied here (version gate, target
  not installed, its module fails to import, a conflict with a patch applied
  before it) is skipped;
* a bad setting (the syntax of ``VLLM_CUSTOM_PATCHES``, an unknown name, an
  unusable ``VLLM_CUSTOM_PATCHES_PATH`` entry) is a failure;
* in strict mode (the default) failures stop start-up with one error that
  lists them all; with ``VLLM_CUSTOM_PATCHES_STRICT=0`` they are logged.

Problems found before anything is applied (names, loading) are raised before
anything is applied.  Each patch is applied atomically by the manager, so
whatever happens, no target is left half-patched.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .._core.errors import (
    PatchApplyError,
    PatchConfigError,
    PatchError,
    PatchLoadError,
    PatchTargetError,
    UnknownPatchError,
)
from .._core.forksafe import ForkSafeRLock
from .._core.log import logger, route_to_vllm_handler
from .._core.manager import PatchManager, PatchState, unknown_name_message
from .._core.patch import VLLMPatch
from .._core.targets import module_of, resolve_target
from .._core.versions import check_gate
from .discovery import ENV_PATH, PatchEntryPoint, find_entry_points, load_path
from .evidence import write_evidence
from .hooks import module_findable, when_imported
from .selection import ENV_PATCHES, ENV_STRICT, ENV_TELEMETRY, Selection, parse_selection, parse_strict, parse_telemetry

__all__ = ["Epoch", "Report", "activate", "enable_telemetry", "switch_waiting"]

PREFIX = "vllm-custom-patches [pid %d]"


@dataclass
class Epoch:
    """Marks the import hooks of one activation.

    wrapt cannot remove a post-import hook, so a test that resets the plugin
    deactivates the epoch instead and the stale hooks do nothing.
    """

    active: bool = True


@dataclass
class Report:
    """What one activation did in this process."""

    applied: list[str] = field(default_factory=list)
    pending: list[tuple[str, str]] = field(default_factory=list)
    """(patch, module it waits for)"""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(patch or file, reason)"""
    failed: list[tuple[str, PatchError]] = field(default_factory=list)
    """(patch, setting or file, error); in strict mode these stop start-up."""

    def summary(self) -> str:
        """The one line ops read: everything, with reasons, on one line."""
        parts = [
            ("applied", ", ".join(self.applied)),
            ("pending", _listed((name, f"waiting for import of {module}") for name, module in self.pending)),
            ("skipped", _listed(self.skipped)),
            ("failed", _listed((label, _reason(label, exc)) for label, exc in self.failed)),
        ]
        return f"{PREFIX % os.getpid()}: " + "; ".join(f"{key}: {text or 'none'}" for key, text in parts)


@dataclass
class _Candidate:
    name: str
    explicit: bool
    patch: type[VLLMPatch[Any]]


def activate(environ: Mapping[str, str], epoch: Epoch) -> Report:
    """Apply what ``environ`` selects; log the summary; raise in strict mode if anything failed."""
    strict = parse_strict(environ.get(ENV_STRICT))
    value = environ.get(ENV_PATCHES, "")
    report = Report()
    enable_telemetry(environ, report.failed)
    try:
        selection = parse_selection(value)
    except PatchConfigError as exc:
        report.failed.append((ENV_PATCHES, exc))
        return _finish(report, strict, value)
    run = _Activation(selection, strict, value, epoch, report)
    candidates = run.resolve(environ.get(ENV_PATH, ""))
    if not (strict and report.failed):
        run.apply(candidates)
    return _finish(report, strict, value)


def enable_telemetry(environ: Mapping[str, str], failed: list[tuple[str, PatchError]]) -> bool:
    """Turn telemetry on for what is applied from now on if ``VLLM_CUSTOM_PATCHES_TELEMETRY`` says so.

    Before anything is applied: every patch of the process is timed, also
    those the kill switch applies later.  Off, ``_runtime.telemetry`` is not
    even imported.  A value that is not a boolean goes to ``failed`` (the
    setting's name, the error) and leaves telemetry off.
    """
    try:
        if not parse_telemetry(environ.get(ENV_TELEMETRY)):
            return False
    except PatchConfigError as exc:
        failed.append((ENV_TELEMETRY, exc))
        return False
    from .telemetry import enable

    enable()
    return True


class _Activation:
    def __init__(self, selection: Selection, strict: bool, value: str, epoch: Epoch, report: Report) -> None:
        self.selection = selection
        self.strict = strict
        self.value = value
        self.epoch = epoch
        self.report = report
        self.tainted: set[str] = set()
        """Modules that raised while being imported; patches they registered are not selectable."""
        self.unloadable: set[str] = set()
        """Entry-point names whose loading failed (already reported)."""

    # -- which patches ------------------------------------------------------

    def resolve(self, path_value: str) -> list[_Candidate]:
        report, selection = self.report, self.selection
        path_failures: list[str] = []
        if path_value.strip():
            loaded = load_path(path_value)
            report.failed.extend((ENV_PATH, exc) for exc in loaded.refused)
            for module_name, exc in loaded.failed.items():
                self.tainted.add(module_name)
                report.skipped.append((loaded.modules[module_name], str(exc)))
                path_failures.append(loaded.modules[module_name])
        entry_points = find_entry_points()
        known = set(entry_points) | {name for name in PatchManager.names() if self._usable(name)}
        hint = ""
        if path_failures:
            hint = f" ({len(path_failures)} file(s) in {ENV_PATH} failed to import: {', '.join(path_failures)})"
        for label, name in [*((n, n) for n in selection.names), *(("-" + n, n) for n in sorted(selection.excluded))]:
            if name not in known:
                report.failed.append((label, UnknownPatchError(unknown_name_message(name, sorted(known)) + hint)))
        candidates: list[_Candidate] = []
        for name in selection.names:
            if name in known:
                patch = self._load(name, entry_points, explicit=True)
                if patch is not None:
                    candidates.append(_Candidate(name, True, patch))
        if not selection.all or (self.strict and report.failed):
            return candidates  # about to fail: import nothing more
        taken = set(selection.names) | selection.excluded
        # Entry points first: importing them may register more patches.
        for name in sorted(set(entry_points) - taken):
            self._load(name, entry_points, explicit=False)
        rest = (set(entry_points) | set(PatchManager.names())) - taken
        for name in sorted(rest):
            if name in self.unloadable:
                continue  # reported as skipped by _load
            if self._usable(name):
                candidates.append(_Candidate(name, False, PatchManager.get(name)))
        return candidates

    def _usable(self, name: str) -> bool:
        try:
            return PatchManager.get(name).__module__ not in self.tainted
        except UnknownPatchError:
            return False

    def _load(
        self, name: str, entry_points: Mapping[str, PatchEntryPoint], *, explicit: bool
    ) -> type[VLLMPatch[Any]] | None:
        declared = entry_points.get(name)
        if declared is None:
            return PatchManager.get(name)
        try:
            return declared.load()
        except PatchError as exc:
            self.unloadable.add(name)
            if isinstance(exc, PatchLoadError):
                self.tainted.add(declared.module)
            if explicit:
                self.report.failed.append((name, exc))
            else:
                self.report.skipped.append((name, str(exc)))
            return None

    # -- applying -------------------------------------------------------------

    def apply(self, candidates: list[_Candidate]) -> None:
        waiting: list[_Waiting] = []
        for candidate in candidates:
            name, patch = candidate.name, candidate.patch
            spec = patch._vcp_spec
            if PatchManager.is_applied(patch):
                self.report.applied.append(name)
                continue
            try:
                check_gate(name, patch._vcp_gate)
                # A target not found without running code waits for its module;
                # if that module is already imported (the name is made on demand,
                # e.g. by a lazy module __getattr__), apply() below resolves it now.
                waits = (
                    resolve_target(spec.target, name, import_module=False) is None
                    and module_of(spec.target) not in sys.modules
                )
            except PatchTargetError:
                waits = False  # apply() below raises it again and records it
            except PatchError as exc:
                self._problem(candidate, exc)
                continue
            if waits:
                module = module_of(spec.target)
                if not module_findable(module):
                    self._problem(
                        candidate,
                        PatchTargetError(
                            f"patch {name!r}: module {module!r} of its target {spec.target_label!r} is not installed."
                        ),
                    )
                    continue
                # Never import the target here: vLLM imports it when (and in
                # the process where) it is used.
                self.report.pending.append((name, module))
                waiting.append(_Waiting(candidate, self.strict, self.value, self.epoch, module))
                continue
            try:
                PatchManager.apply(patch)
            except PatchError as exc:
                self._problem(candidate, exc)
            else:
                self.report.applied.append(name)
        for entry in waiting:
            _arm(entry)

    def _problem(self, candidate: _Candidate, exc: PatchError) -> None:
        if candidate.explicit:
            PatchManager._set_outcome(candidate.name, PatchState.FAILED, str(exc))
            self.report.failed.append((candidate.name, exc))
        else:
            PatchManager._set_outcome(candidate.name, PatchState.SKIPPED, str(exc))
            self.report.skipped.append((candidate.name, str(exc)))


# -- patches waiting for their target's module -------------------------------------------


@dataclass
class _Waiting:
    """A patch armed to apply when ``module`` is imported, with the policy it was selected under."""

    candidate: _Candidate
    strict: bool
    value: str
    epoch: Epoch
    module: str


# Armed patches by name, in the order they were armed.  Re-entrant: the hook
# applies under it, and applying may import (and so fire other hooks).  The
# hook holds it from taking its patches to applying them, so the kill switch
# (switch_waiting) sees a patch either still waiting or applied, never between.
_waiting_lock = ForkSafeRLock()  # a forked child must not find it held by a thread it lacks
_waiting: dict[str, _Waiting] = {}
# Disarmed by the kill switch before their module was imported: re-armed as they were.
_disarmed: dict[str, _Waiting] = {}
# Modules our hook is registered for and has not fired on yet (wrapt forgets a hook once it fired).
_hooked: set[str] = set()


def _arm(entry: _Waiting) -> None:
    name = entry.candidate.name
    with _waiting_lock:
        _waiting[name] = entry
        _disarmed.pop(name, None)
        PatchManager._set_outcome(name, PatchState.PENDING, f"waiting for import of {entry.module}")
        if entry.module not in _hooked:
            _hooked.add(entry.module)
            when_imported(entry.module, _on_import)


def switch_waiting(action: str, patch: type[VLLMPatch[Any]]) -> str:
    """The kill switch's step for a patch that waits for its target's module to be imported here.

    ``rollback`` disarms a waiting patch (the import then leaves it alone) and
    ``apply`` arms one (as if it had been selected at start-up), where that
    module is not imported yet.  Returns ``"changed"``, ``"unchanged"`` (it
    already waits), ``"irrelevant"`` (its module cannot be imported here) or
    ``"live"``: it does not wait, change it on its imported target.
    """
    name = patch._vcp_spec.name
    module = module_of(patch._vcp_spec.target)
    with _waiting_lock:
        entry = _waiting.get(name)
        if entry is not None and not entry.epoch.active:
            del _waiting[name]
            entry = None
        if action == "rollback":
            if entry is None:
                return "live"
            del _waiting[name]
            _disarmed[name] = entry
            with PatchManager._registry.lock:
                PatchManager._registry.outcomes.pop(name, None)
            return "changed"
        if entry is not None:
            return "unchanged"
        if module in sys.modules:
            return "live"
        if not module_findable(module):
            return "irrelevant"
        previous = _disarmed.get(name)
        if previous is not None and previous.epoch.active and previous.candidate.patch is patch:
            _arm(previous)
        else:
            # Applied by the kill switch, not selected: a failure at import is
            # logged and the patch skipped, as for a patch taken in by '*'.
            selection = os.environ.get(ENV_PATCHES, "")
            _arm(_Waiting(_Candidate(name, False, patch), False, selection, Epoch(), module))
        return "changed"


def _forget_waiting() -> None:
    """For tests (``plugin._reset_for_tests``): no patch waits any more; registered hooks find nothing."""
    with _waiting_lock:
        _waiting.clear()
        _disarmed.clear()


def _on_import(module: ModuleType) -> None:
    """The post-import hook: apply the patches that wait for ``module``."""
    with _waiting_lock:
        _hooked.discard(module.__name__)
        group = [entry for entry in _waiting.values() if entry.module == module.__name__]
        for entry in group:
            del _waiting[entry.candidate.name]
        group = [entry for entry in group if entry.epoch.active]
        if group:
            _apply_waiting(group, module)


def _apply_waiting(group: list[_Waiting], module: ModuleType) -> None:
    pid = os.getpid()
    failed: list[tuple[str, PatchError]] = []
    applied: list[_Candidate] = []
    # One activation per process arms the explicit patches, so they share its policy.
    strict = any(entry.strict for entry in group if entry.candidate.explicit)
    value = next((entry.value for entry in group if entry.candidate.explicit), "")
    for candidate in (entry.candidate for entry in group):
        try:
            applied_now = PatchManager._apply_on_import(candidate.patch)
        except PatchError as exc:
            state = PatchState.FAILED if candidate.explicit else PatchState.SKIPPED
            PatchManager._set_outcome(candidate.name, state, str(exc))
            if candidate.explicit:
                failed.append((candidate.name, exc))
            else:
                logger.warning(
                    PREFIX + ": skipped patch %r on import of %s: %s", pid, candidate.name, module.__name__, exc
                )
        else:
            if applied_now:
                applied.append(candidate)
                logger.info(PREFIX + ": applied pending patch %r on import of %s", pid, candidate.name, module.__name__)
    write_evidence()
    if failed:
        if strict:
            # The failed import drops the module from sys.modules, and with it
            # the classes just patched: roll them back so that the registry
            # never reports as applied a patch on a class nobody can reach.
            first = failed[0][0]
            for candidate in reversed(applied):
                PatchManager.rollback(candidate.patch)
                PatchManager._set_outcome(
                    candidate.name, PatchState.FAILED, f"rolled back: patch {first!r} failed on the same import"
                )
            # Raised into the import statement: the process stops where the
            # target is first needed instead of running without its patch.
            raise _combined(failed, value)
        for name, error in failed:
            logger.error(PREFIX + ": %s=0: running without patch %r: %s", pid, ENV_STRICT, name, error)


def _finish(report: Report, strict: bool, value: str) -> Report:
    route_to_vllm_handler()
    logger.info("%s", report.summary())
    write_evidence()
    if report.failed:
        if strict:
            raise _combined(report.failed, value)
        logger.warning(
            PREFIX + ": %s=0: starting without what failed: %s",
            os.getpid(),
            ENV_STRICT,
            ", ".join(label for label, _ in report.failed),
        )
    return report


def _combined(failed: list[tuple[str, PatchError]], value: str) -> PatchError:
    """One error listing every failure, of the first failure's type, chained to it."""
    first = failed[0][1]
    lines = "\n".join(f"  - {_entry(label, exc)}" for label, exc in failed)
    message = (
        f"vllm-custom-patches: {ENV_PATCHES}={value!r} cannot be honoured in process "
        f"{os.getpid()}{_process_name()}:\n{lines}\nFix the patch or the setting named above, remove the patch "
        f"from {ENV_PATCHES}, or set {ENV_STRICT}=0 to log such problems and start without "
        f"those patches."
    )
    try:
        error = type(first)(message)
    except Exception:  # a foreign PatchError subclass with another signature
        error = PatchApplyError(message)
    error.__cause__ = first
    return error


def _process_name() -> str:
    # vLLM names its processes after their role and rank (EngineCore_DP1,
    # VllmWorker-1): in a multi-rank server that is what says where it failed.
    import multiprocessing

    name = multiprocessing.current_process().name
    return "" if name == "MainProcess" else f" ({name})"


def _reason(label: str, exc: BaseException) -> str:
    # Errors about a setting start with the setting's name; say it once.
    text = str(exc)
    return text[len(label) + 2 :] if text.startswith(label + ": ") else text


def _entry(label: str, exc: BaseException) -> str:
    text = str(exc)
    return text if text.startswith((label + ":", label + "=")) else f"{label}: {text}"


def _listed(entries: Any) -> str:
    return ", ".join(f"{label} ({_one_line(reason)})" for label, reason in entries)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
