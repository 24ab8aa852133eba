"""``vllm-custom-patches doctor``: every way a selected patch can silently not work with a vLLM.

Checked without starting an engine, against the installed vLLM or (statically)
against one that is not installed (see ``_vllm_views``):

* the setup: the general plugin installed and not filtered out by
  ``VLLM_PLUGINS``, the selection parses, names are known, the vLLM version;
* per patch: its gate, its target, each overridden member present and of
  the original's kind (method, static or class method, property, plain
  attribute: ``_kinds``), the override accepting every call the original
  accepts, its ``_original_`` references, conflicts between the selected
  patches;
* against a named baseline, per member: the patch's lock for the members
  locked (the lock directory's, else the one shipped with the patch), else
  the vLLM given as ``--baseline``, else the installed vLLM; with none of
  them, a warning per patch says that drift was not checked.  Against it: a
  member that *moved* (defined in the target on one side, inherited on the
  other), an original whose code changed (with a diff; an error for members
  the author locked, a warning otherwise), parameters an original gained;
* reach: subclasses in the target's package that override a patched member
  without calling ``super()`` (their instances never run the patch).
* semantic drift (``surface``): the state of the target the patch's code
  reads and writes, and the vLLM members (bases included) that touch it,
  against the surface its lock records (drift is an error), else against the
  baseline vLLM (a warning): members that newly touch it, changed (with a
  diff) or are gone, a new attribute created like one the patch uses (a
  sibling queue); an attribute or an annotated field the patch reads that no
  longer exists is an error either way.

Errors: missing target or member, a changed kind not marked
``@changes_kind``, incompatible signature, unresolvable
``_original_`` reference, conflict, a move, a locked member's changed code,
a subclass that overrides a patched member without reaching it, a gate that
excludes the version of a patch selected by name (one taken in by ``*`` or by
default is only reported as excluded, a warning: the plugin skips it there).
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .._core.graft import is_override_marked
from .._core.kinds import describe_change, describe_kind, kind_change, member_kind
from .._core.patch import VLLMPatch
from .._core.stacks import preview_chains
from .._core.targets import target_label
from .fingerprint import LockedVersion, fingerprint, pick_version, read_locks
from .vllm_views import InstalledView, Original, TargetNotFound, View, function_signature

__all__ = [
    "DoctorReport",
    "Finding",
    "baseline_of",
    "cell_of",
    "check_environment",
    "check_patches",
    "summary_of",
    "verdict_of",
]

_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"


@dataclass(frozen=True)
class Finding:
    severity: str
    """``error``, ``warning`` or ``info``."""
    check: str
    """plugin, setting, version, gate, target, member, kind, signature, conflict, stack (info: a stack the
    selected patches form), moved, drift, reach, apply, baseline, surface, framework (an integration
    point of vLLM the framework itself uses: ``_upgrade.framework``)."""
    message: str
    patch: str = ""
    member: str = ""
    detail: str = ""
    """A unified diff, for drift."""
    members: tuple[str, ...] = ()
    """The members a finding about several is about (baseline)."""
    baseline: str = ""
    """What the members were compared with (baseline); empty: nothing."""


@dataclass
class DoctorReport:
    vllm: str
    patches: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    version: str = ""
    """The checked vLLM's release (``vllm`` is its label)."""
    gates: dict[str, str] = field(default_factory=dict)
    """Patch -> its gate, for the patches that have one."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "vllm": self.vllm,
            "version": self.version,
            "ok": not self.errors,
            "patches": {name: summary_of(self, name) for name in self.patches},
            "findings": [asdict(f) for f in self.findings],
        }


def verdict_of(report: DoctorReport, patch: str) -> str:
    """``ok``, ``excluded``, ``warning: ...`` or ``error: ...`` (the first such finding) for one patch."""
    for severity in ("error", "warning"):
        for finding in report.findings:
            if finding.patch == patch and finding.severity == severity:
                if severity == "warning" and _excluded(report, patch):
                    return "excluded"
                return f"{severity}: {finding.message}"
    return "ok"


def _excluded(report: DoctorReport, patch: str) -> bool:
    return any(f.patch == patch and f.check == "gate" for f in report.findings)


def summary_of(report: DoctorReport, patch: str) -> dict[str, Any]:
    """One patch's verdict with every error and warning, its gate and the baseline of each member."""
    mine = [f for f in report.findings if f.patch == patch]
    errors = [f.message for f in mine if f.severity == "error"]
    warnings = [f.message for f in mine if f.severity == "warning"]
    excluded = _excluded(report, patch)
    verdict = "error" if errors else "excluded" if excluded else "warning" if warnings else "ok"
    baseline: dict[str, str | None] = {}
    for finding in mine:
        if finding.check == "baseline":
            baseline.update(dict.fromkeys(finding.members, finding.baseline or None))
    return {"verdict": verdict, "gate": report.gates.get(patch), "excluded_by_gate": excluded,
            "errors": errors, "warnings": warnings, "baseline": baseline}  # fmt: skip


def cell_of(report: DoctorReport, patch: str) -> str:
    """One patch in a matrix column: its gate exclusion, then every error, else every warning, else ``ok``."""
    mine = [f for f in report.findings if f.patch == patch]
    # Named, the exclusion is an error (start-up fails); taken in by '*', the plugin skips the patch.
    parts = [
        f"{'error: ' if f.severity == 'error' else ''}excluded by gate {report.gates.get(patch, '')}".rstrip()
        for f in mine
        if f.check == "gate"
    ]
    errors = [f"error: {f.message}" for f in mine if f.severity == "error" and f.check != "gate"]
    warnings = [f"warning: {f.message}" for f in mine if f.severity == "warning" and f.check != "gate"]
    failed = any(f.severity == "error" for f in mine)
    return "; ".join(parts + (errors if failed else warnings)) or "ok"


def baseline_of(report: DoctorReport, patch: str) -> str:
    """What each member's drift was measured against, in a line: ``m1, m2: <baseline>; m3: none``."""
    parts = [
        f"{', '.join(f.members)}: {f.baseline or 'none, drift not checked'}"
        for f in report.findings
        if f.patch == patch and f.check == "baseline"
    ]
    return "; ".join(parts)


# -- the setup -------------------------------------------------------------------------


def check_environment(environ: Mapping[str, str], view: View | None = None) -> list[Finding]:
    """The plugin is installed and vLLM will load it; where ``view`` is the installed vLLM, its version is known.

    (A vLLM read statically has the version its wheel or tree declares: nothing to check here.)"""
    import importlib_metadata

    findings = []
    names = {ep.name for ep in importlib_metadata.entry_points(group="vllm.general_plugins")}
    if "custom_patches" not in names:
        findings.append(Finding("error", "plugin", "the vllm.general_plugins entry point 'custom_patches' is not installed "
                                "in this environment: pip install vllm-custom-patches next to vLLM"))  # fmt: skip
    plugins = environ.get("VLLM_PLUGINS")
    if plugins is not None:
        listed = plugins.split(",")  # exactly as vLLM splits it: no stripping
        if "custom_patches" not in listed:
            stripped = [item.strip() for item in listed]
            hint = (
                f"it lists {' custom_patches'!r} with a space, which vLLM does not strip; write "
                f"VLLM_PLUGINS={','.join(stripped)}"
                if "custom_patches" in stripped
                else f"add it: VLLM_PLUGINS={','.join([*filter(None, listed), 'custom_patches'])}"
            )
            findings.append(Finding("error", "plugin", f"VLLM_PLUGINS={plugins!r} does not list custom_patches, so vLLM "
                                    f"never runs the plugin: {hint}"))  # fmt: skip
    if isinstance(view, InstalledView) and _release(view.version) is None:
        findings.append(Finding("error", "version", f"the installed vLLM's version {view.raw!r} ({view.source}) is "
                                "not a PEP 440 version, so no gate can be checked: set "
                                "VLLM_CUSTOM_PATCHES_VLLM_VERSION to the release it is built from, e.g. 0.32.0"))  # fmt: skip
    if view is not None:
        findings += _check_framework(view)
    return findings


def _check_framework(view: View) -> list[Finding]:
    """The vLLM integration points the framework itself relies on, in ``view``'s vLLM (``_upgrade.framework``)."""
    from .framework import check_framework, installed_tree

    tree = getattr(view, "tree", None) if not isinstance(view, InstalledView) else installed_tree()
    if tree is None:
        return []
    return [Finding(p.severity, "framework", p.message, member=p.where) for p in check_framework(tree)]


def _release(version: str) -> Any:
    from .._core.versions import release_of

    return release_of(version)


# -- the patches -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reference:
    """What one member was on the baseline: the lock (locked) or another vLLM."""

    label: str
    defined_in: str
    own: bool
    signature: inspect.Signature | None
    source: str | None
    locked: bool


def check_patches(
    patches: Sequence[type[VLLMPatch[Any]]],
    view: View,
    baseline: View | None = None,
    *,
    together: bool = True,
    explicit: bool | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
) -> list[Finding]:
    """Every finding about ``patches`` against ``view``.

    ``baseline``: what the members no lock records are compared with (the vLLM given as
    ``--baseline``, else the installed one); ``None``: nothing, and a warning per patch says so.
    ``together``: they were selected to be applied together: conflicts between them are
    errors (as the plugin would fail); otherwise each is judged alone.  ``explicit`` (default:
    ``together``): selected by name, so a gate that excludes the version is an error (start-up
    fails); otherwise it is a warning and nothing else is checked (the plugin skips the patch).
    ``lock_dir``: the user's lock directory, read with the lock shipped next to each patch.
    """
    explicit = together if explicit is None else explicit
    findings: list[Finding] = []
    checked = []
    for patch_cls in patches:
        mine = _check_one(patch_cls, view, baseline, explicit=explicit, lock_dir=lock_dir)
        findings += mine
        if not any(f.check == "gate" and f.severity != "error" for f in mine):  # skipped by the plugin
            checked.append(patch_cls)
    if together:
        findings += _check_conflicts(checked, view)
    else:
        for patch_cls in checked:
            findings += _check_conflicts([patch_cls], view)
    return findings


def _check_one(
    patch_cls: type[VLLMPatch[Any]],
    view: View,
    baseline: View | None,
    *,
    explicit: bool,
    lock_dir: str | os.PathLike[str] | None,
) -> list[Finding]:
    spec = patch_cls._vcp_spec
    name = spec.name
    out: list[Finding] = []
    gate = patch_cls._vcp_gate
    if gate is not None:
        release = _release(view.version)
        if release is None:
            out.append(Finding("error", "version", f"its gate ({gate}) cannot be checked: the vLLM version "
                               f"{view.raw!r} is not a PEP 440 version; set VLLM_CUSTOM_PATCHES_VLLM_VERSION to "
                               "the release it is built from", name))  # fmt: skip
        elif not gate.contains(release, prereleases=True):
            if not explicit:
                out.append(Finding("warning", "gate", f"excluded by its gate ({gate}) on vLLM {view.version}: the "
                                   "plugin skips it there (name it to check it anyway)", name))  # fmt: skip
                return out
            out.append(Finding("error", "gate", f"excluded by its gate ({gate}) on vLLM {view.version}: start-up "
                               "fails there, since it is selected by name", name))  # fmt: skip
    refs, named, unchecked, lock = _baseline(patch_cls, view, baseline, lock_dir)
    overridden: list[str] = []
    found: list[Finding] = []
    try:
        for member_name, member in spec.members.items():
            original = view.member(spec.target, name, member_name)
            ref = refs.get(member_name)
            if original is None:
                if is_override_marked(member) or member_name in spec.original_refs or ref is not None:
                    why = (
                        ("it calls self._original_" + member_name)
                        if member_name in spec.original_refs
                        else (
                            "it is marked @override"
                            if is_override_marked(member)
                            else f"it replaced it on {ref.label if ref else ''}"
                        )
                    )
                    found.append(Finding("error", "member", f"{spec.target_label} has no member {member_name!r}, "
                                         f"which the patch replaces ({why}): it was removed or renamed", name,
                                         member_name))  # fmt: skip
                continue
            overridden.append(member_name)
            found += _check_member(name, member_name, member, original, ref)
        found += _check_reach(spec.target, name, set(overridden), view)
    except TargetNotFound as exc:
        found.append(Finding("error", "target", f"its target is missing: {exc}", name))
    if not any(f.check == "target" for f in found):
        warned = any(member in unchecked for member in overridden)  # "no baseline: drift not checked"
        found += _check_surface(patch_cls, view, baseline, lock, warned=warned)
    return out + _baseline_findings(name, overridden, named, unchecked) + found


def _baseline(
    patch_cls: type[VLLMPatch[Any]], view: View, baseline: View | None, lock_dir: str | os.PathLike[str] | None
) -> tuple[dict[str, _Reference], dict[str, str], dict[str, str], LockedVersion | None]:
    """Per member, what the checked vLLM is compared with: the lock for the members locked, else
    ``baseline``.  Returns the references, what each member's baseline is called, for the
    members without one why not, and the lock entry used (its surface is the surface's baseline)."""
    from .signatures import signature_from_ast

    spec = patch_cls._vcp_spec
    refs: dict[str, _Reference] = {}
    named: dict[str, str] = {}
    unchecked: dict[str, str] = {}
    module = sys.modules.get(patch_cls.__module__)
    locks = read_locks(spec.name, getattr(module, "__file__", None), lock_dir)
    version = pick_version(locks, view.version)
    if version is not None:
        locked: LockedVersion = locks[version]
        for name, member in locked.members.items():
            if name not in spec.members:
                continue
            node = _first_def(member.source)
            refs[name] = _Reference(f"vLLM {version} (locked)", member.defined_in, member.defined_in == spec.target_label,
                                    signature_from_ast(node) if node is not None else None, member.source, locked=True)  # fmt: skip
            named[name] = f"vLLM {version} as locked in {locked.where()}"
    rest = [name for name in spec.members if name not in refs]
    if baseline is None:
        why = "not locked; no vLLM installed here; no --baseline"
        unchecked.update(dict.fromkeys(rest, why))
    elif baseline.version == view.version:
        named.update(dict.fromkeys(rest, f"{baseline.label}, the same release: nothing to compare"))
    else:
        try:
            for name in rest:
                original = baseline.member(spec.target, spec.name, name)
                if original is None:
                    unchecked[name] = f"{baseline.label} has no member {name!r}"
                    continue
                refs[name] = _Reference(baseline.label, original.defined_in, original.own, original.signature,
                                        original.source, locked=False)  # fmt: skip
                named[name] = baseline.label
        except TargetNotFound as exc:
            unchecked.update({name: f"not in {baseline.label}: {exc}" for name in rest if name not in named})
    return refs, named, unchecked, locks[version] if version is not None else None


def _baseline_findings(
    patch: str, members: Sequence[str], named: Mapping[str, str], unchecked: Mapping[str, str]
) -> list[Finding]:
    """Per patch: what each overridden member's drift was measured against, or a warning that it was not."""
    groups: dict[str, list[str]] = {}
    for member in members:
        if member in named:
            groups.setdefault(named[member], []).append(member)
    out = []
    for label, group in groups.items():
        message = f"drift of {', '.join(group)} measured against {label}"
        out.append(Finding("info", "baseline", message, patch, members=tuple(group), baseline=label))
    missing = [member for member in members if member in unchecked]
    if missing:
        whys = "; ".join(dict.fromkeys(unchecked[member] for member in missing))
        out.append(Finding("warning", "baseline", f"no baseline: drift not checked for {', '.join(missing)} ({whys}): "
                           "pass --baseline VERSION|PATH (the vLLM the patch was written for) or lock the patch",
                           patch, members=tuple(missing)))  # fmt: skip
    return out


def _check_surface(
    patch_cls: type[VLLMPatch[Any]],
    view: View,
    baseline: View | None,
    lock: LockedVersion | None,
    *,
    warned: bool = False,
) -> list[Finding]:
    """Semantic drift: the patch's dependency surface (``surface``) on ``view`` against the one ``lock``
    records (errors for drift), else against ``baseline`` (warnings); with neither, a warning says so
    (info where ``warned``: the patch's warning that it has no baseline at all says it already)."""
    from .surface import compare, compute_surface, surface_from_json, tree_of

    spec = patch_cls._vcp_spec
    tree = tree_of(view, spec.target_label)
    surface = compute_surface(patch_cls, tree) if tree is not None else None
    if tree is None or surface is None:  # no target there (reported already), or no source of the patch's code
        return []
    version = lock.version if lock is not None else None
    base, label, locked = None, "", False
    if lock is not None and "surface" in lock.entry:
        base = surface_from_json(lock.entry["surface"], spec.target_label)
        label, locked = f"vLLM {version} (locked)", True
    elif baseline is not None and baseline.version != view.version:
        baseline_tree = tree_of(baseline, spec.target_label)
        base = compute_surface(patch_cls, baseline_tree) if baseline_tree is not None else None
        label = f"vLLM {baseline.version}"
    if base is None:
        if version == view.version or (baseline is not None and baseline.version == view.version):
            return []  # the release it was locked at or compared with: nothing can have drifted
        why = f"the lock at vLLM {version} records none" if version is not None else "not locked"
        severity = "info" if warned and version is None else "warning"
        return [Finding(severity, "surface", f"no baseline for its dependency surface: semantic drift not checked "
                        f"({why}; no other vLLM to compare with): lock the patch again, or pass --baseline "
                        "VERSION|PATH", spec.name)]  # fmt: skip
    if set(base.members) - set(surface.members):  # what became of them
        surface = compute_surface(patch_cls, tree, keep=base.members) or surface
    found = compare(base, surface, base_label=label, label=f"vLLM {view.version}", locked=locked)
    return [Finding("info", "surface", f"its dependency surface measured against {label}", spec.name)] + [
        Finding(f.severity, "surface", f.message, spec.name, f.member, f.detail) for f in found
    ]


def _check_member(
    patch: str, member_name: str, member: object, original: Original, ref: _Reference | None
) -> list[Finding]:
    from .signatures import describe, gained_parameters, incompatibilities

    out = []
    mine = member_kind(member, member_name)
    changed = original.kind is not None and mine is not None and mine != original.kind
    change = kind_change(original.kind, member, member_name)
    if change is not None:
        out.append(
            Finding("error", "kind", describe_change(member_name, original.defined_in, change), patch, member_name)
        )
    elif changed:
        assert original.kind is not None and mine is not None
        out.append(Finding("info", "kind", f"{member_name!r} is {describe_kind(mine)} in the patch and "
                           f"{describe_kind(original.kind)} in {original.defined_in}: marked @changes_kind, so every "
                           "caller must call it the new way", patch, member_name))  # fmt: skip
    override_sig = function_signature(member)
    # Two kinds are called differently: their signatures do not compare.
    if original.signature is not None and override_sig is not None and not changed:
        problems = incompatibilities(original.signature, override_sig)
        gained = gained_parameters(ref.signature, original.signature) if ref and ref.signature else []
        note = f" (new since {ref.label}: {', '.join(gained)})" if gained and ref else ""
        for problem in problems:
            out.append(Finding("error", "signature", f"{member_name}{describe(override_sig)} cannot take every call the "
                               f"original {member_name}{describe(original.signature)} accepts: {problem}{note}",
                               patch, member_name))  # fmt: skip
        if gained and not problems and ref:
            out.append(Finding("info", "signature", f"the original {member_name} gained {', '.join(gained)} since "
                               f"{ref.label}; the override accepts it", patch, member_name))  # fmt: skip
    if ref is None:
        return out
    if ref.own != original.own:

        def where(is_own: bool, holder: str) -> str:
            return "defined in the target itself" if is_own else f"inherited from {holder}"

        out.append(Finding("error", "moved", f"{member_name} moved: {where(ref.own, ref.defined_in)} on {ref.label}, "
                           f"{where(original.own, original.defined_in)} here; the original the patch wraps is other code",
                           patch, member_name))  # fmt: skip
    if (
        ref.source is not None
        and original.source is not None
        and fingerprint(ref.source) != fingerprint(original.source)
    ):
        diff = "".join(difflib.unified_diff(_lines(ref.source), _lines(original.source),
                                            f"{member_name} ({ref.label})", f"{member_name} (checked)"))  # fmt: skip
        severity = "error" if ref.locked else "warning"
        why = (
            "the patch is locked against it"
            if ref.locked
            else "a pass-through wrapper does not care; one that re-implements it does"
        )
        out.append(Finding(severity, "drift", f"the original {original.defined_in.split(':')[-1]}.{member_name} changed "
                           f"since {ref.label} ({why})", patch, member_name, diff))  # fmt: skip
    return out


def _lines(source: str) -> list[str]:
    return (source if source.endswith("\n") else source + "\n").splitlines(True)


def _check_reach(target: Any, patch: str, overridden: set[str], view: View) -> list[Finding]:
    out = []
    for sub in view.subclass_overrides(target, patch, overridden):
        if sub.calls_super:
            out.append(Finding("info", "reach", f"{sub.cls} overrides {sub.member} and calls super(): the patch runs "
                               "inside it", patch, sub.member))  # fmt: skip
        else:
            out.append(Finding("error", "reach", f"{sub.cls} overrides {sub.member} without calling super(): its "
                               f"instances never run the patch's {sub.member}; patch {sub.cls.split(':')[-1]} too, "
                               "or the class vLLM really instantiates", patch, sub.member))  # fmt: skip
    if target_label(target) == _SCHEDULER:
        out.append(Finding("info", "reach", "vLLM instantiates AsyncScheduler (a subclass) when async scheduling is on, "
                           "its default, Scheduler otherwise, or the class --scheduler-cls names (not checked here)", patch))  # fmt: skip
    return out


def _first_def(source: str) -> Any:
    import ast
    import textwrap

    for node in ast.parse(textwrap.dedent(source)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def _check_conflicts(patches: Sequence[type[VLLMPatch[Any]]], view: View) -> list[Finding]:
    if isinstance(view, InstalledView):
        return _apply_each(patches)

    def overrides(spec: Any) -> list[str]:
        try:
            return [member for member in spec.members if view.member(spec.target, spec.name, member) is not None]
        except TargetNotFound:
            return []  # reported by the target check

    # As the manager would refuse them, applying in order: a patch that
    # conflicts is not applied, so it owns nothing for the ones after it.
    owners: dict[tuple[str, str], str] = {}
    tokens: dict[str, str] = {}  # exclusive token -> the patch that declared it
    stackable: set[str] = set()
    kept = []
    out = []
    for patch_cls in patches:
        spec = patch_cls._vcp_spec
        shared = sorted(token for token in spec.exclusive if token in tokens)
        if shared:
            out.append(Finding("error", "conflict", f"patch {spec.name!r} and selected patch {tokens[shared[0]]!r} "
                               f"both declare exclusive={{{shared[0]!r}}}; they are never applied together", spec.name))  # fmt: skip
            continue
        stacks = set(overrides(spec)) if spec.stackable else set()
        taken = {
            member: owners[(spec.target_label, member)]
            for member in spec.members
            if (spec.target_label, member) in owners
            and not (member in stacks and owners[(spec.target_label, member)] in stackable)  # they stack
        }
        if taken:
            clash = ", ".join(f"{spec.target_label}.{member} (owned by {owner!r})" for member, owner in taken.items())
            out.append(Finding("error", "conflict", f"patch {spec.name!r} replaces what another selected patch "
                               f"replaces: {clash}; two patches cannot own one member (only overrides of stackable=True "
                               f"patches stack)", spec.name))  # fmt: skip
            continue
        owners.update({(spec.target_label, member): spec.name for member in spec.members})
        tokens.update(dict.fromkeys(spec.exclusive, spec.name))
        stackable.update([spec.name] if spec.stackable else [])
        kept.append(spec)
    for name, lines in preview_chains(kept, overrides).items():
        out += [Finding("info", "stack", f"stack {line}", name) for line in lines]
    return out


def _apply_each(patches: Sequence[type[VLLMPatch[Any]]]) -> list[Finding]:
    """Apply them, in order, in a scratch registry against the installed vLLM; what refuses; all rolled back."""
    from .._core.errors import PatchConflictError, PatchError, PatchTargetError, PatchVersionError
    from .._core.manager import PatchManager
    from ..testing import isolated_registry

    out = []
    with isolated_registry():
        try:
            for patch_cls in patches:
                try:
                    PatchManager.apply(patch_cls)
                except (PatchTargetError, PatchVersionError):
                    continue  # reported by the member, target and gate checks, with more detail
                except PatchConflictError as exc:
                    out.append(Finding("error", "conflict", str(exc), patch_cls._vcp_spec.name))
                except PatchError as exc:
                    out.append(Finding("error", "apply", str(exc), patch_cls._vcp_spec.name))
            for status in PatchManager.status():  # each stack as the selected set forms it
                out += [Finding("info", "stack", f"stack {line}", status.name) for line in status.stacks]
        finally:
            PatchManager.rollback_all()
    return out
