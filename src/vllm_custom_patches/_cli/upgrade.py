"""The ``doctor``, ``show`` and ``lock`` commands: upgrade safety from the command line.

    vllm-custom-patches doctor [NAME ...] [--vllm-source PATH | --vllm VERSION] [--json]
    vllm-custom-patches doctor [NAME ...] --matrix 0.32.0,0.33.0 [--json]
    vllm-custom-patches show NAME [--json]
    vllm-custom-patches lock [NAME ...] [--member M ...] [--vllm-source PATH | --vllm VERSION]

Exit codes: 0 nothing wrong (warnings allowed), 1 an error found, 2 a bad
setting or argument.  A vLLM that is not installed is read statically from an
unpacked wheel or source tree (``--vllm-source``), or from the wheel of
``--vllm VERSION``, downloaded once with ``pip download --no-deps`` into
``$VLLM_CUSTOM_PATCHES_CACHE_DIR`` (default ``~/.cache/vllm-custom-patches``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "run"]


def add_commands(commands: Any) -> list[argparse.ArgumentParser]:
    """Register the three subcommands on the CLI's subparsers; returns them (they get --json)."""
    doctor = commands.add_parser(
        "doctor",
        help="find every way the selected patches can silently not work with a vLLM (installed or not)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    doctor.add_argument(
        "names", nargs="*", help="patches to check (default: what $VLLM_CUSTOM_PATCHES selects, or all)"
    )
    _vllm_choice(doctor)
    doctor.add_argument(
        "--matrix", metavar="V1,V2", help="check each patch on its own against each of these vLLM versions: a table"
    )
    doctor.add_argument("-v", "--verbose", action="store_true", help="also print what is fine but worth knowing (info)")
    show = commands.add_parser(
        "show", help="a patch's target, gate, and each member's original and override signatures"
    )
    show.add_argument("name")
    _vllm_choice(show)
    lock = commands.add_parser(
        "lock", help="record the originals a patch replaces (fingerprint and source) in its lock file"
    )
    lock.add_argument("names", nargs="*", help="patches to lock (default: what $VLLM_CUSTOM_PATCHES selects, or all)")
    lock.add_argument(
        "--member", action="append", default=[], help="lock only this member (repeatable; default: every override)"
    )
    _vllm_choice(lock)
    return [doctor, show, lock]


def _vllm_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vllm-source",
        metavar="PATH",
        help="a vLLM that is not installed: the directory holding its vllm/ package, or a .whl",
    )
    parser.add_argument(
        "--vllm",
        metavar="VERSION",
        help="a vLLM release to read from its wheel (downloaded once); the installed one if it matches",
    )


class _Usage(Exception):
    """A bad argument or setting: exit 2 with this message."""


def run(args: argparse.Namespace) -> int:
    from .._core.errors import PatchError
    from .._core.manager import PatchManager
    from .._upgrade.fingerprint import LockFileError
    from ..testing import isolated_registry

    with isolated_registry():
        try:
            if args.command == "doctor":
                return _doctor(args)
            if args.command == "show":
                return _show(args)
            return _lock(args)
        except (_Usage, PatchError, LockFileError) as exc:
            print(f"vllm-custom-patches: {exc}", file=sys.stderr)
            return 2
        finally:
            PatchManager.rollback_all()


# -- which vLLM, which patches --------------------------------------------------------


def _installed() -> Any:
    from .._core.versions import detect_vllm_version
    from .._upgrade.vllm_views import InstalledView

    detected = detect_vllm_version()
    return InstalledView(str(detected.release) if detected.release else str(detected.raw))


def _view(source: str | None, version: str | None) -> Any:
    from .._upgrade.vllm_views import StaticView

    installed = _installed()
    if source is None and (version is None or version == installed.version):
        return installed
    root = Path(source) if source else _download(version or "")
    if not root.exists():
        raise _Usage(f"--vllm-source {root} does not exist; give the directory that holds vllm/, or a vLLM .whl")
    from .._upgrade.static import WheelError

    try:
        view = StaticView(root, version or "0")
    except WheelError as exc:
        raise _Usage(str(exc)) from None
    except Exception as exc:  # an unreadable file or directory, a corrupt wheel
        raise _Usage(f"--vllm-source {root} cannot be read: {type(exc).__name__}: {exc}") from None
    if view.tree.module_path("vllm") is None:
        raise _Usage(
            f"--vllm-source {root} is not vLLM: it holds no vllm/ package; give an unpacked vLLM wheel or source tree"
        )
    if version is None:
        view.version = _version_of(root)
        view.label = f"vLLM {view.version} (source {root})"
    from packaging.version import InvalidVersion, Version

    try:  # gates and lock files compare it as a version
        Version(view.version)
    except InvalidVersion:
        raise _Usage(
            f"the vLLM version {view.version!r} of {root} is not a PEP 440 version; pass --vllm VERSION, e.g. 0.33.0"
        ) from None
    return view


def _version_of(root: Path) -> str:
    match = re.match(r"vllm(?:_cpu)?-([^-]+)-", root.name)
    if root.suffix == ".whl" and match:
        return match.group(1)
    for candidate in (root / "vllm" / "_version.py", root / "vllm" / "version.py"):
        if candidate.is_file():
            found = re.search(r"""version\s*=\s*['"]([^'"]+)['"]""", candidate.read_text())
            if found:
                return found.group(1).split("+")[0]
    raise _Usage(f"cannot tell the vLLM version of {root}; pass --vllm VERSION")


def _download(version: str) -> Path:
    from .._upgrade.static import wheel_cache_dir

    if not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version):
        raise _Usage(f"--vllm {version!r} is not a version, e.g. 0.33.0")
    cache = wheel_cache_dir()
    found = sorted(cache.glob(f"vllm-{version}-*.whl"))
    if not found:
        print(f"vllm-custom-patches: downloading the vllm {version} wheel into {cache} (once)", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "-d", str(cache), f"vllm=={version}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        found = sorted(cache.glob(f"vllm-{version}-*.whl"))
        if result.returncode != 0 or not found:
            raise _Usage(f"could not download vllm=={version}: {result.stderr.strip()[-500:]}")
    return found[-1]


def _patches(names: list[str]) -> tuple[list[Any], list[Any], bool]:
    """The patch classes to look at, findings about the selection itself, and whether it was explicit."""
    from .._core.errors import PatchError
    from .._core.manager import PatchManager, unknown_name_message
    from .._runtime.discovery import ENV_PATH, find_entry_points, load_path
    from .._runtime.selection import ENV_PATCHES, parse_selection
    from .._upgrade.doctor import Finding

    findings = []
    if os.environ.get(ENV_PATH, "").strip():
        loaded = load_path(os.environ[ENV_PATH])
        for module, error in loaded.failed.items():
            findings.append(Finding("error", "setting", f"{ENV_PATH}: {module} failed to import: {error}"))
    entry_points = find_entry_points()
    known = sorted(set(PatchManager.names()) | set(entry_points))
    explicit = bool(names)
    if not names:
        selection = parse_selection(os.environ.get(ENV_PATCHES))  # a bad value raises: exit 2
        names = list(selection.names)
        explicit = not selection.empty and not selection.all
        if selection.empty or selection.all:
            names += [n for n in known if n not in names and n not in selection.excluded]
    classes = []
    for name in names:
        try:
            if name in PatchManager.names():
                classes.append(PatchManager.get(name))
            elif name in entry_points:
                classes.append(entry_points[name].load())
            else:
                findings.append(Finding("error", "setting", unknown_name_message(name, known), name))
        except PatchError as exc:
            findings.append(Finding("error", "setting", f"patch {name!r} cannot be loaded: {exc}", name))
    return classes, findings, explicit


# -- the commands -------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    from .._upgrade.doctor import DoctorReport, check_environment, check_patches

    classes, selection_findings, explicit = _patches(args.names)
    installed = _installed()
    versions = [v.strip() for v in args.matrix.split(",") if v.strip()] if args.matrix else [None]
    reports = []
    for version in versions:
        view = _view(args.vllm_source, version or args.vllm)
        report = DoctorReport(view.label, [c._vcp_spec.name for c in classes])
        report.findings += check_environment(os.environ) + selection_findings
        # Patches taken in by '*' (or by default) are alternatives the plugin
        # skips on conflict: only an explicit selection must fit together.
        # (A matrix is patch by patch: each alone.)
        report.findings += check_patches(classes, view, installed, together=explicit and not args.matrix)
        reports.append(report)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports] if args.matrix else reports[0].as_dict(), indent=2))
    elif args.matrix:
        _print_matrix(reports, versions)
    else:
        _print_report(reports[0], verbose=args.verbose)
    return 1 if any(r.errors for r in reports) else 0


def _print_report(report: Any, verbose: bool) -> None:
    from .._upgrade.doctor import verdict_of

    print(report.vllm)
    marks = {"error": "ERROR  ", "warning": "WARNING", "info": "info   "}
    shown = [f for f in report.findings if verbose or f.severity != "info"]
    for finding in [f for f in shown if f.patch not in report.patches]:  # the setup, unknown names
        print(f"  {marks[finding.severity]} {finding.message}")
    for name in report.patches:
        verdict = verdict_of(report, name).split(":")[0].upper()
        print(f"{name}: {verdict}")
        for finding in [f for f in shown if f.patch == name]:
            print(f"  {marks[finding.severity]} [{finding.check}] {finding.message}")
            for line in finding.detail.splitlines():
                print(f"      {line}")
    errors = len(report.errors)
    print(f"{len(report.patches)} patch(es), {errors} error(s)")


def _print_matrix(reports: list[Any], versions: list[str | None]) -> None:
    from .._upgrade.doctor import verdict_of

    print("| patch | " + " | ".join(f"vLLM {v}" for v in versions) + " |")
    print("|---|" + "---|" * len(versions))
    for name in reports[0].patches:
        cells = [verdict_of(r, name).replace("|", "\\|") for r in reports]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


def _show(args: argparse.Namespace) -> int:
    from packaging.version import Version

    from .._upgrade.fingerprint import fingerprint, read_lock
    from .._upgrade.signatures import describe
    from .._upgrade.vllm_views import TargetNotFound, function_signature

    classes, findings, _ = _patches([args.name])
    if not classes:
        raise _Usage(findings[0].message if findings else f"no patch named {args.name!r}")
    (patch_cls,) = classes
    spec, view = patch_cls._vcp_spec, _view(args.vllm_source, args.vllm)
    lock = read_lock(getattr(sys.modules.get(patch_cls.__module__), "__file__", None), spec.name)
    members = []
    for name, member in spec.members.items():
        try:
            original = view.member(spec.target, spec.name, name)
        except TargetNotFound as exc:
            raise _Usage(str(exc)) from None
        override = function_signature(member)
        locked = lock.get(view.version, {}).get(name) or (lock[max(lock, key=Version)].get(name) if lock else None)
        state = "not locked"
        if locked is not None and original is not None and original.source is not None:
            state = "matches the lock" if fingerprint(original.source) == locked.fingerprint else "CHANGED since locked"
        members.append({
            "member": name,
            "kind": "override" if original is not None else "addition",
            "original": f"{name}{describe(original.signature)}" if original and original.signature else None,
            "defined_in": original.defined_in if original else None,
            "override": f"{name}{describe(override)}" if override else None,
            "fingerprint": state if original is not None else None,
        })  # fmt: skip
    info = {"name": spec.name, "target": spec.target_label, "gate": str(patch_cls._vcp_gate or ""),
            "vllm": view.label, "description": spec.description, "members": members}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{spec.name}: {spec.target_label}  (vLLM {info['gate'] or 'any'}; checked against {view.label})")
    if spec.description:
        print("  " + spec.description.strip().splitlines()[0])
    for m in members:
        print(f"  {m['member']} ({m['kind']}{', ' + m['fingerprint'] if m['fingerprint'] else ''})")
        if m["original"]:
            print(f"      original  {m['original']}   [{m['defined_in']}]")
        if m["override"]:
            print(f"      override  {m['override']}")
    return 0


def _lock(args: argparse.Namespace) -> int:
    from .._upgrade.fingerprint import LockedMember, fingerprint, write_lock
    from .._upgrade.vllm_views import TargetNotFound

    classes, findings, _ = _patches(args.names)
    if findings:
        raise _Usage("; ".join(f.message for f in findings))
    view = _view(args.vllm_source, args.vllm)
    for patch_cls in classes:
        spec = patch_cls._vcp_spec
        module_file = getattr(sys.modules.get(patch_cls.__module__), "__file__", None)
        if module_file is None:
            raise _Usage(f"patch {spec.name!r} has no module file to put a lock next to")
        locked = {}
        for name in spec.members:
            if args.member and name not in args.member:
                continue
            try:
                original = view.member(spec.target, spec.name, name)
            except TargetNotFound as exc:
                raise _Usage(f"cannot lock {spec.name!r}: {exc}") from None
            if original is not None and original.source is not None:
                locked[name] = LockedMember(fingerprint(original.source), original.defined_in, original.source)
        unknown = set(args.member) - set(spec.members)
        if unknown:
            raise _Usage(f"patch {spec.name!r} has no member(s) {', '.join(sorted(unknown))}")
        path = write_lock(module_file, spec.name, spec.target_label, view.version, locked)
        print(f"locked {spec.name} against {view.label}: {', '.join(sorted(locked)) or 'nothing'} -> {path}")
    return 0
