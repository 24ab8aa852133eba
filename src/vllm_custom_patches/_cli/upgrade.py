"""The ``doctor``, ``show`` and ``lock`` commands: upgrade safety from the command line.

    vllm-custom-patches doctor [NAME ...] [--vllm VERSION | --vllm-source PATH [--vllm VERSION]]
                               [--baseline VERSION|PATH] [--lock-dir DIR] [--json] [-v]
    vllm-custom-patches doctor [NAME ...] --matrix VERSION|PATH,... [--baseline VERSION|PATH] [--json]
    vllm-custom-patches show NAME [--vllm VERSION | --vllm-source PATH] [--lock-dir DIR] [--json]
    vllm-custom-patches lock [NAME ...] [--member M ...] [--vllm VERSION | --vllm-source PATH]
                             [--lock-dir DIR] [--force]

Exit codes: 0 nothing wrong (warnings allowed), 1 an error found, 2 a bad
invocation or unreadable input (one line on stderr naming it and the fix).

Which vLLM: the installed one; ``--vllm VERSION``, the installed one if it is
that release, else the wheel of that release, downloaded once with ``pip
download --no-deps`` into ``$VLLM_CUSTOM_PATCHES_CACHE_DIR`` (default
``~/.cache/vllm-custom-patches``) and read statically; ``--vllm-source PATH``,
an unpacked wheel, a source tree or a ``.whl``, whose version is read from the
tree itself (``vllm/_version.py``, ``vllm/version.py`` or a
``vllm-*.dist-info/METADATA``), or named with ``--vllm VERSION`` where the tree
does not say (a git checkout).  In ``--matrix`` and ``--baseline``, such a tree
is named ``VERSION=PATH``.  Where vLLM is not installed, one of them is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._env import ENV_LOCK_DIR

__all__ = ["add_commands", "run"]

_NOT_INSTALLED = (
    "vLLM is not installed here, so there is no vLLM to check: pass --vllm VERSION (a release, read from "
    "its wheel) or --vllm-source PATH (an unpacked wheel or a source tree)"
)


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
        "--matrix",
        metavar="V1,V2",
        help="check each patch against each of these vLLMs: versions (0.34.0), paths (a wheel, a tree), "
        "VERSION=PATH for a tree that does not say its version; a table",
    )
    doctor.add_argument(
        "--baseline",
        metavar="VERSION|PATH",
        help="the vLLM the patches were written for: drift of the members no lock records is measured "
        "against it (default: the installed vLLM)",
    )
    _lock_dir_option(doctor)
    doctor.add_argument("-v", "--verbose", action="store_true", help="also print what is fine but worth knowing (info)")
    show = commands.add_parser(
        "show", help="a patch's target, gate, and each member's original and override signatures"
    )
    show.add_argument("name")
    _vllm_choice(show)
    _lock_dir_option(show)
    lock = commands.add_parser(
        "lock", help="record the originals a patch replaces (fingerprint and source) in its lock file"
    )
    lock.add_argument("names", nargs="*", help="patches to lock (default: what $VLLM_CUSTOM_PATCHES selects, or all)")
    lock.add_argument(
        "--member", action="append", default=[], help="lock only this member (repeatable; default: every override)"
    )
    _vllm_choice(lock)
    _lock_dir_option(lock)
    lock.add_argument("--force", action="store_true", help="lock against a vLLM version the patch's own gate excludes")
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
        help="a vLLM release to read from its wheel (downloaded once); the installed one if it matches; "
        "with --vllm-source, the version of a tree that does not say",
    )


def _lock_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lock-dir",
        metavar="DIR",
        help=f"your own locks, DIR/<patch>.lock.json, read with those shipped with the patches (yours win); "
        f"default ${ENV_LOCK_DIR}",
    )


class _Usage(Exception):
    """A bad argument, setting or input: exit 2 with this message."""


def run(args: argparse.Namespace) -> int:
    from .._core.errors import PatchError
    from .._core.manager import PatchManager
    from .._upgrade.fingerprint import LockFileError
    from ..testing import isolated_registry

    try:
        with isolated_registry():
            try:
                if args.command == "doctor":
                    return _doctor(args)
                if args.command == "show":
                    return _show(args)
                return _lock(args)
            finally:
                PatchManager.rollback_all()
    except (_Usage, PatchError, LockFileError) as exc:
        return _fail(str(exc))
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:  # vLLM's source, read statically
        where = getattr(exc, "filename", None) or "a file"
        return _fail(f"cannot read {where} ({type(exc).__name__}: {exc}); is that vLLM's source complete?")
    except Exception as exc:  # never a traceback: a bug of ours, said as one
        return _fail(f"internal error, please report it: {type(exc).__name__}: {exc}")


def _fail(message: str) -> int:
    print("vllm-custom-patches: " + " ".join(message.split()), file=sys.stderr)
    return 2


# -- which vLLM -----------------------------------------------------------------------


class _Views:
    """The vLLMs a command names, each resolved once."""

    def __init__(self) -> None:
        from .._upgrade.vllm_views import installed_view

        self.installed = installed_view()
        self._static: dict[tuple[str, str | None], Any] = {}

    def checked(self, source: str | None, version: str | None) -> Any:
        """The vLLM to check: ``--vllm-source`` (named by ``--vllm``), ``--vllm``, or the installed one."""
        if source is not None:
            return self.source(source, version, "--vllm-source")
        if version is not None:
            return self.release(version, "--vllm")
        if self.installed is None:
            raise _Usage(_NOT_INSTALLED)
        return self.installed

    def item(self, text: str, flag: str) -> Any:
        """One vLLM of ``--matrix`` or ``--baseline``: ``VERSION``, ``PATH`` or ``VERSION=PATH``."""
        version, sep, path = text.partition("=")
        if sep:
            return self.source(path, version, flag)
        if _is_path(text):
            return self.source(text, None, flag)
        return self.release(text, flag)

    def release(self, version: str, flag: str) -> Any:
        release = _pep440(version, flag)
        # The installed vLLM only if it is that release by its own account: $VLLM_CUSTOM_PATCHES_VLLM_VERSION
        # renames a build for the gates, it does not make it another release's code.
        if self.installed is not None and self.installed.version == release and not self.installed.overridden:
            return self.installed
        return self.source(str(_download(version, flag)), release, flag)

    def source(self, path: str, version: str | None, flag: str) -> Any:
        key = (os.path.abspath(path), version)
        if key not in self._static:
            self._static[key] = _static_view(Path(path), version, flag)
        return self._static[key]


def _is_path(text: str) -> bool:
    return os.sep in text or text.endswith(".whl") or text.startswith((".", "~")) or os.path.exists(text)


def _pep440(version: str, flag: str) -> str:
    """The release ``version`` names (what gates and lock files compare), or exit 2."""
    from .._core.versions import release_of

    release = release_of(version) if version.strip() else None
    if release is None:
        raise _Usage(f"{flag} {version!r}: the vLLM version {version!r} is not a PEP 440 version; give a release, "
                     "e.g. 0.34.0")  # fmt: skip
    return str(release)


def _static_view(root: Path, version: str | None, flag: str) -> Any:
    from .._core.versions import release_of
    from .._upgrade.static import WheelError, tree_version
    from .._upgrade.vllm_views import StaticView

    if not root.exists():
        raise _Usage(f"{flag} {root} does not exist; give the directory that holds vllm/, or a vLLM .whl")
    try:
        view = StaticView(root, "0")  # its version is read from the tree below
    except WheelError as exc:
        raise _Usage(str(exc)) from None
    except Exception as exc:  # an unreadable file or directory, a corrupt wheel
        raise _Usage(f"{flag} {root} cannot be read: {type(exc).__name__}: {exc}") from None
    if view.tree.module_path("vllm") is None:
        raise _Usage(
            f"{flag} {root} is not vLLM: it holds no vllm/ package; give an unpacked vLLM wheel or source tree"
        )
    found = tree_version(view.tree.root)
    if found is None and (match := re.match(r"vllm(?:[-_]cpu)?-([^-]+)-.*\.whl$", root.name)):
        found = (match.group(1), "the wheel's file name")
    named = _pep440(version, "--vllm" if flag == "--vllm-source" else flag) if version is not None else None
    if found is None:
        if named is None:
            how = f"--vllm-source {root} --vllm VERSION" if flag == "--vllm-source" else f"{flag} VERSION={root}"
            raise _Usage(f"cannot tell the vLLM version of {root}: no vllm/_version.py, vllm/version.py or "
                         f"vllm-*.dist-info/METADATA says it (a git checkout before a build); name it: {how}")  # fmt: skip
        view.name_version(named, version or named)
        return view
    raw, where = found
    release = release_of(raw)
    if named is not None and release is not None and str(release) != named:
        raise _Usage(f"{root} is vLLM {raw} ({where}), not {version}: drop the version you gave, or give the tree "
                     "you meant")  # fmt: skip
    if release is None and named is None:
        how = f"--vllm-source {root} --vllm VERSION" if flag == "--vllm-source" else f"{flag} VERSION={root}"
        raise _Usage(f"the vLLM version {raw!r} of {root} ({where}) is not a PEP 440 version; name the release it "
                     f"is built from: {how}")  # fmt: skip
    view.name_version(named or str(release), raw if release is not None else (version or raw))
    return view


def _download(version: str, flag: str) -> Path:
    from .._upgrade.static import wheel_cache_dir

    if not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version):
        raise _Usage(f"{flag} {version!r} is not a version, e.g. 0.34.0")
    cache = wheel_cache_dir()

    def cached() -> list[Path]:  # vllm-0.34.0-*.whl for --vllm 0.34 too: the same version
        from packaging.version import InvalidVersion, Version

        found = []
        for wheel in sorted(cache.glob("vllm-*.whl")):
            try:
                if Version(wheel.name.split("-")[1]) == Version(version):
                    found.append(wheel)
            except (InvalidVersion, IndexError):
                continue
        return found

    found = cached()
    if not found:
        arguments = ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                     "--platform", "manylinux_2_28_x86_64", "-d", str(cache), f"vllm=={version}"]  # fmt: skip
        pip = _pip()
        if pip is None:  # a venv made without pip (uv, pipx): the wheel can still be put there by hand
            raise _Usage(f"no pip here to download the vllm {version} wheel with: install pip, or run 'pip "
                         f"{' '.join(arguments)}' once, or pass --vllm-source WHEEL")  # fmt: skip
        print(f"vllm-custom-patches: downloading the vllm {version} wheel into {cache} (once)", file=sys.stderr)
        command = [*pip, *arguments]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            said = ([line.strip() for line in result.stderr.splitlines() if line.strip()] or [""])[-1]
        except OSError as exc:
            result, said = None, f"{type(exc).__name__}: {exc}"
        found = cached()
        if result is None or result.returncode != 0 or not found:
            raise _Usage(f"could not download the vllm {version} wheel ({said[-300:] or 'pip said nothing'}): check "
                         "the version and the network, or fetch the wheel yourself and pass --vllm-source WHEEL")  # fmt: skip
    return found[-1]


def _pip() -> list[str] | None:
    """How to run pip: this interpreter's, else one on the PATH."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    return [found] if found else None


def _lock_dir(args: argparse.Namespace, *, made_by_lock: bool = False) -> Path | None:
    """``--lock-dir``, else ``$VLLM_CUSTOM_PATCHES_LOCK_DIR``, else none.  It must be a directory;
    for ``lock`` one that does not exist yet will be made when a lock is written."""
    value, flag = (args.lock_dir, "--lock-dir") if args.lock_dir else (os.environ.get(ENV_LOCK_DIR), ENV_LOCK_DIR)
    if value is None or not value.strip():
        return None
    path = Path(value.strip()).expanduser().absolute()
    if not (path.is_dir() or (made_by_lock and not path.exists())):
        raise _Usage(f"{flag} {path} is not a directory: create it (lock --lock-dir {path} does) or fix the setting")
    return path


# -- which patches --------------------------------------------------------------------


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
        for refused in loaded.refused:
            findings.append(Finding("error", "setting", f"{ENV_PATH}: {refused}"))
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


def _module_file(patch_cls: Any) -> str | None:
    file = getattr(sys.modules.get(patch_cls.__module__), "__file__", None)
    return file if isinstance(file, str) else None


def _patch_version(patch_cls: Any) -> Any:
    """The version of the patch that is locked: the distribution that declares its entry point;
    else its module's ``__version__``; else unknown (a patch file of ``VLLM_CUSTOM_PATCHES_PATH``)."""
    from .._runtime.discovery import find_entry_points
    from .._upgrade.fingerprint import PatchVersion

    entry = find_entry_points().get(patch_cls.name)
    dists = {ep.dist.name: ep.dist.version for ep in entry.declared if ep.dist is not None} if entry else {}
    if len(dists) == 1 and entry is not None and entry.module == patch_cls.__module__:
        ((name, version),) = dists.items()
        return PatchVersion(version, f"distribution {name}")
    declared = getattr(sys.modules.get(patch_cls.__module__), "__version__", None)
    if isinstance(declared, str) and declared.strip():
        return PatchVersion(declared.strip(), f"{patch_cls.__module__}.__version__")
    return PatchVersion(None, "unknown: not from an installed distribution, and its module has no __version__")


# -- the commands -------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    from .._upgrade.doctor import DoctorReport, check_environment, check_patches

    views = _Views()
    items: list[str] = []
    if args.matrix is not None:
        if args.vllm_source is not None or args.vllm is not None:
            raise _Usage("--matrix names every vLLM it checks (versions or paths, e.g. --matrix 0.33.0,PATH); "
                         "drop --vllm/--vllm-source and put that vLLM in the matrix")  # fmt: skip
        items = [item.strip() for item in args.matrix.split(",") if item.strip()]
        if not items:
            raise _Usage(f"--matrix {args.matrix!r} names no vLLM; give versions or paths, e.g. --matrix 0.33.0,0.34.0")
        columns = [views.item(item, "--matrix") for item in items]
    else:
        columns = [views.checked(args.vllm_source, args.vllm)]
    baseline = views.item(args.baseline, "--baseline") if args.baseline is not None else views.installed
    lock_dir = _lock_dir(args)
    classes, selection_findings, explicit = _patches(args.names)
    names = [c._vcp_spec.name for c in classes]
    gates = {c._vcp_spec.name: str(c._vcp_gate) for c in classes if c._vcp_gate is not None}
    reports = []
    for view in columns:
        report = DoctorReport(view.label, list(names), version=view.version, gates=gates)
        report.findings += check_environment(os.environ, view) + selection_findings
        # Patches taken in by '*' (or by default) are alternatives the plugin skips on
        # conflict: only an explicit selection must fit together.  (A matrix: each alone.)
        together = explicit and args.matrix is None
        report.findings += check_patches(
            classes, view, baseline, together=together, explicit=explicit, lock_dir=lock_dir
        )
        reports.append(report)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports] if args.matrix else reports[0].as_dict(), indent=2))
    elif args.matrix:
        _print_matrix(reports, columns, items)
    else:
        _print_report(reports[0], verbose=args.verbose)
    return 1 if any(r.errors for r in reports) else 0


def _print_report(report: Any, verbose: bool) -> None:
    from .._upgrade.doctor import summary_of

    print(report.vllm)
    marks = {"error": "ERROR  ", "warning": "WARNING", "info": "info   "}
    shown = [f for f in report.findings if verbose or f.severity != "info"]
    for finding in [f for f in shown if f.patch not in report.patches]:  # the setup, unknown names
        print(f"  {marks[finding.severity]} {finding.message}")
    for name in report.patches:
        print(f"{name}: {summary_of(report, name)['verdict'].upper()}")
        for finding in report.findings:  # what drift was measured against, always
            if finding.patch == name and finding.check == "baseline" and finding.severity == "info":
                print(f"  baseline {finding.message}")
        for finding in [f for f in shown if f.patch == name and not (f.check == "baseline" and f.severity == "info")]:
            print(f"  {marks[finding.severity]} [{finding.check}] {finding.message}")
            for line in finding.detail.splitlines():
                print(f"      {line}")
    errors = len(report.errors)
    print(f"{len(report.patches)} patch(es), {errors} error(s)")


def _print_matrix(reports: list[Any], columns: Sequence[Any], items: Sequence[str]) -> None:
    from .._upgrade.doctor import baseline_of, cell_of

    def header(view: Any, item: str) -> str:
        return f"vLLM {view.version}" if "=" not in item and not _is_path(item) else f"vLLM {view.version} ({item})"

    print("| patch | " + " | ".join(header(v, i) for v, i in zip(columns, items, strict=True)) + " |")
    print("|---|" + "---|" * len(columns))
    for name in reports[0].patches:
        cells = [cell_of(r, name).replace("|", "\\|") for r in reports]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    lines = []
    for name in reports[0].patches:
        seen = {header(v, i): baseline_of(r, name) for r, v, i in zip(reports, columns, items, strict=True)}
        if len(set(seen.values()) - {""}) == 1:
            lines.append(f"- `{name}`: {next(b for b in seen.values() if b)}")
        elif any(seen.values()):
            lines.append(f"- `{name}`: " + "; ".join(f"on {col}: {b}" for col, b in seen.items() if b))
    if lines:
        print("\nDrift measured against (per member):")
        print("\n".join(lines))


def _show(args: argparse.Namespace) -> int:
    from .._upgrade.fingerprint import fingerprint, pick_version, read_locks
    from .._upgrade.signatures import describe
    from .._upgrade.vllm_views import TargetNotFound, function_signature

    view = _Views().checked(args.vllm_source, args.vllm)
    lock_dir = _lock_dir(args)
    classes, findings, _ = _patches([args.name])
    if not classes:
        raise _Usage(findings[0].message if findings else f"no patch named {args.name!r}")
    (patch_cls,) = classes
    spec = patch_cls._vcp_spec
    locks = read_locks(spec.name, _module_file(patch_cls), lock_dir)
    version = pick_version(locks, view.version)
    locked = locks[version] if version is not None else None
    members = []
    for name, member in spec.members.items():
        try:
            original = view.member(spec.target, spec.name, name)
        except TargetNotFound as exc:
            raise _Usage(str(exc)) from None
        override = function_signature(member)
        held = locked.members.get(name) if locked is not None else None
        state = "not locked"
        if held is not None and original is not None and original.source is not None:
            same = fingerprint(original.source) == held.fingerprint
            state = f"{'matches the lock' if same else 'CHANGED since locked'} at vLLM {version}"
        members.append({
            "member": name,
            "kind": "override" if original is not None else "addition",
            "original": f"{name}{describe(original.signature)}" if original and original.signature else None,
            "defined_in": original.defined_in if original else None,
            "override": f"{name}{describe(override)}" if override else None,
            "fingerprint": state if original is not None else None,
        })  # fmt: skip
    lock_info = None
    if locked is not None:
        lock_info = {"file": str(locked.path), "owner": locked.owner, "version": locked.version, "vllm": locked.vllm,
                     "patch_version": locked.patch.version, "patch_version_from": locked.patch.source,
                     "versions": sorted(locks)}  # fmt: skip
    info = {"name": spec.name, "target": spec.target_label, "gate": str(patch_cls._vcp_gate or ""),
            "vllm": view.label, "description": spec.description, "lock": lock_info, "members": members}  # fmt: skip
    info.update(_composition(spec, {m["member"] for m in members if m["kind"] == "override"}))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{spec.name}: {spec.target_label}  (vLLM {info['gate'] or 'any'}; checked against {view.label})")
    if spec.description:
        print("  " + spec.description.strip().splitlines()[0])
    if locked is not None:
        patch_version = locked.patch.version or "unknown"
        print(f"  lock: vLLM {locked.version} in {locked.where()} (patch version {patch_version}, "
              f"{locked.patch.source}); locked versions: {', '.join(sorted(locks))}")  # fmt: skip
    else:
        print("  lock: none")
    if spec.stackable or spec.exclusive:
        order = f" (order {spec.order})" if spec.order else ""
        print(f"  {'stackable' + order if spec.stackable else 'not stackable'}"
              f"{'; exclusive ' + ', '.join(info['exclusive']) if spec.exclusive else ''}")  # fmt: skip
    for line in info["stacks"]:
        print(f"  stack {line}")
    for m in members:
        print(f"  {m['member']} ({m['kind']}{', ' + m['fingerprint'] if m['fingerprint'] else ''})")
        if m["original"]:
            print(f"      original  {m['original']}   [{m['defined_in']}]")
        if m["override"]:
            print(f"      override  {m['override']}")
    return 0


def _composition(spec: Any, overridden: set[str]) -> dict[str, Any]:
    """How the patch composes: its keywords, and the stacks it would form with every stackable patch selected."""
    from .._core.stacks import preview_chains

    others, _, _ = _patches([])
    specs = [spec, *(other._vcp_spec for other in others if other._vcp_spec.name != spec.name)]
    chains = preview_chains(
        specs, lambda each: [m for m in each.members if m in overridden and each.target_label == spec.target_label]
    )
    return {"stackable": spec.stackable, "order": spec.order, "exclusive": sorted(spec.exclusive),
            "stacks": chains.get(spec.name, [])}  # fmt: skip


def _surface_of(patch_cls: Any, view: Any) -> dict[str, Any] | None:
    """The patch's dependency surface on ``view``, as its lock records it; None where the target's source is not there."""
    from .._upgrade.surface import compute_surface, surface_to_json, tree_of

    tree = tree_of(view, patch_cls._vcp_spec.target_label)
    surface = compute_surface(patch_cls, tree) if tree is not None else None
    return surface_to_json(surface) if surface is not None else None


def _lock(args: argparse.Namespace) -> int:
    from .._core.versions import release_of
    from .._upgrade.fingerprint import (
        LockedMember,
        fingerprint,
        lock_entry,
        lock_path,
        read_locks,
        user_lock_path,
        write_lock,
    )
    from .._upgrade.vllm_views import TargetNotFound

    view = _Views().checked(args.vllm_source, args.vllm)
    classes, findings, _ = _patches(args.names)
    if findings:
        raise _Usage("; ".join(f.message for f in findings))
    release = release_of(view.version)
    if release is None:
        raise _Usage(f"cannot lock against vLLM {view.raw!r}: not a PEP 440 version; set VLLM_CUSTOM_PATCHES_VLLM_VERSION "
                     "to the release it is built from, or pass --vllm VERSION")  # fmt: skip
    lock_dir = _lock_dir(args, made_by_lock=True)
    # Everything is checked before anything is written: a refused lock changes no file.
    planned = []
    for patch_cls in classes:
        spec = patch_cls._vcp_spec
        gate = patch_cls._vcp_gate
        if gate is not None and not gate.contains(release, prereleases=True) and not args.force:
            raise _Usage(f"patch {spec.name!r} is gated to vLLM {gate}, which excludes {view.version}: review it "
                         f"against {view.version} and widen its gate first, or pass --force to lock it anyway")  # fmt: skip
        unknown = set(args.member) - set(spec.members)
        if unknown:
            raise _Usage(f"patch {spec.name!r} has no member(s) {', '.join(sorted(unknown))}")
        module_file = _module_file(patch_cls)
        if lock_dir is not None:
            path = user_lock_path(lock_dir, spec.name)
        elif module_file is not None:
            path = lock_path(module_file)
        else:
            raise _Usage(f"patch {spec.name!r} has no module file to put a lock next to; pass --lock-dir DIR")
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
        read_locks(spec.name, None if lock_dir else module_file, lock_dir)  # the file it goes to, if corrupt: refused
        patch = _patch_version(patch_cls)
        entry = lock_entry(locked, vllm=view.raw, patch=patch, surface=_surface_of(patch_cls, view))
        planned.append((spec, path, entry, locked, patch))
    for spec, path, entry, locked, patch in planned:
        written = write_lock(path, spec.name, spec.target_label, view.version, entry)
        version = f"{spec.name} {patch.version}" if patch.version else f"{spec.name} (version unknown)"
        surface = " and its dependency surface" if "surface" in entry else ""
        print(f"locked {version} against {view.label}: {', '.join(sorted(locked)) or 'nothing'}{surface} -> {written}")
    return 0
