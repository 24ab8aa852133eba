"""``vllm-custom-patches``: see which patches exist and find out why one will not apply.

    vllm-custom-patches list             # every patch this environment can see
    vllm-custom-patches check [NAME...]  # try them against the installed vLLM, then roll back
    vllm-custom-patches version          # the vLLM version the gates compare
    vllm-custom-patches doctor|show|lock # upgrade safety, see _doctor_cli
    vllm-custom-patches status --url URL # a running server: every process's patches
    vllm-custom-patches rollback NAME --url URL --token T   # its kill switch (and 'apply')
    vllm-custom-patches apply NAME --dp-ranks 1 --url URL --token T   # a canary; then 'promote NAME'
    vllm-custom-patches compare NAME --url URL   # that canary's ranks against the others

``--json`` gives machine-readable output.  ``check`` exits 1 if any checked
patch would fail, which makes it usable as a container health gate before
``vllm serve``; ``status`` exits 1 if the server's processes disagree and 2
if it cannot tell; ``rollback``/``apply``/``promote`` exit 3 when a refused
change could not be undone in every process (see ``_remote``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn, TextIO

from .._core.errors import PatchError
from .._core.manager import PatchManager
from .._core.patch import VLLMPatch
from .._core.stacks import preview_chains
from .._core.versions import detect_vllm_version
from .._runtime.discovery import ENV_PATH, find_entry_points, load_path
from .._runtime.selection import ENV_PATCHES, parse_selection
from ..testing import isolated_registry


@dataclass
class _Row:
    name: str
    source: str
    target: str = ""
    versions: str = ""
    result: str = ""
    """ok / skipped / failed (check), or loaded / not loaded / failed (list)."""
    reason: str = ""
    overrides: list[str] = field(default_factory=list)
    additions: list[str] = field(default_factory=list)
    description: str = ""
    stackable: bool = False
    order: int = 0
    exclusive: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)
    """Each stack the patch is a layer of: after check, as applied; in list, the visible stackable
    patches' stacks on members known to be overrides (targets already imported)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (its usage is one ``--help`` away); subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="vllm-custom-patches", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list every patch this environment can see")
    listing.add_argument("--no-import", action="store_true", help="do not import patch modules (names only)")
    check = commands.add_parser("check", help="apply patches in a scratch registry, report, roll back")
    check.add_argument(
        "names",
        nargs="*",
        help=f"patches to check, in order (default: what ${ENV_PATCHES} selects, or all if unset); "
        "a patch named here or in the variable fails, one taken in by '*' is skipped, as in vLLM",
    )
    commands.add_parser("version", help="the detected vLLM version")
    status = commands.add_parser(
        "status",
        help="ask a running vLLM server which patches each of its processes has applied",
        description="GET URL/custom_patches (the custom_patches endpoint plugin) and show every process "
        "of the server: exit 0 if consistent, 1 if a process lacks a patch others of its role have "
        "or did not answer, 2 if the server cannot tell.",
    )
    status.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    status.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY") or None,
        help="the server's API key, if it has one (default: $VLLM_API_KEY)",
    )
    status.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to wait for the answer (default 30)")
    controls = []
    for action, verb, what in (
        ("rollback", "roll back", "roll back NAME in every process of the server, or in none; with --dp-ranks, "
         "on some ranks of its active canary"),
        ("apply", "apply", "apply NAME in every process of the server, or in none; with --dp-ranks, in the engine "
         "cores and workers of those data-parallel ranks only (a canary, listed by status until promoted or "
         "rolled back)"),
        ("promote", "promote the canary of", "apply NAME, which has an active canary, on every rank, and end "
         "its rollout 'promoted'"),
    ):  # fmt: skip
        control = commands.add_parser(
            action,
            help=f"{verb} a patch in a running vLLM server (its kill switch{', canaries' if action != 'promote' else ''})",
            description=f"POST URL/custom_patches/NAME/{action}: {what}. Exit 0 when done, 1 when refused "
            "(nothing changed: a process refused and everything was put back, or the server refused first), "
            "2 when the request did not get that far, 3 when a process refused and some process could not be "
            "put back (INCONSISTENT, named).",
        )
        control.add_argument("name", help="the patch")
        control.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
        control.add_argument(
            "--token",
            default=os.environ.get("VLLM_CUSTOM_PATCHES_CONTROL_TOKEN") or None,
            help="the server's VLLM_CUSTOM_PATCHES_CONTROL_TOKEN (default: that variable here)",
        )
        control.add_argument("--reason", default="", help="why, for the server's log")
        control.add_argument(
            "--timeout", type=_seconds, default=60.0, help="seconds to wait for the answer (default 60)"
        )
        if action != "promote":
            control.add_argument(
                "--dp-ranks",
                type=_dp_ranks,
                default=None,
                help="only on these data-parallel ranks, comma-separated, e.g. 1 or 1,3 (a canary)",
            )
        if action == "apply":
            control.add_argument(
                "--guard",
                action="append",
                default=[],
                dest="guards",
                metavar="EXPR",
                help="roll the canary back by itself when it breaks this, e.g. 'ttft_p99<=1.2x' or 'errors==0' "
                "(repeatable; needs --dp-ranks)",
            )
            control.add_argument(
                "--window",
                type=_seconds,
                default=None,
                metavar="S",
                help="seconds a guard must be broken before it rolls the canary back (default 60)",
            )
        controls.append(control)
    from .upgrade import add_commands

    upgrade = add_commands(commands)
    from .compare import add_command

    compare = add_command(commands, _seconds)
    for sub in (listing, check, commands.choices["version"], status, *controls, *upgrade, compare):
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    if args.command == "status":
        return _status(args)
    if args.command == "compare":
        from .compare import run as run_compare

        return run_compare(args)
    if args.command in ("rollback", "apply", "promote"):
        return _control(args)
    if args.command in ("doctor", "show", "lock"):
        from .upgrade import run

        return run(args)

    if args.command == "version":
        detected = detect_vllm_version()
        release = detected.release
        info = {"version": detected.raw, "source": detected.source, "release": str(release) if release else None}
        print(json.dumps(info) if args.json else f"vLLM {detected}; gates compare release {info['release']}")
        return 0
    with isolated_registry():
        try:
            rows = _list(import_modules=not args.no_import) if args.command == "list" else _check(args.names)
        except PatchError as exc:
            print(f"vllm-custom-patches: {exc}", file=sys.stderr)
            return 2
        finally:
            PatchManager.rollback_all()
    if args.json:
        print(json.dumps({"vllm": detect_vllm_version().raw, "patches": [asdict(row) for row in rows]}, indent=2))
    else:
        _print_table(rows)
    return 1 if any(row.result == "failed" for row in rows) else 0


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _dp_ranks(text: str) -> list[int]:
    """``--dp-ranks 1,3``: distinct non-negative integers."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and part.isascii() for part in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of data-parallel ranks; give e.g. 1 or 1,3"
        )
    ranks = [int(part) for part in parts]
    repeated = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r} names rank(s) {repeated} more than once; name each rank once")
    return sorted(ranks)


def _status(args: argparse.Namespace) -> int:
    from .._ops.remote import fetch_status, print_status, status_exit_code

    return _remote(
        args, lambda: fetch_status(args.url, args.api_key, timeout=args.timeout), print_status, status_exit_code
    )


def _control(args: argparse.Namespace) -> int:
    from .._ops.remote import control_exit_code, post_control, print_control

    def ask() -> dict[str, Any]:
        return post_control(
            args.url,
            args.command,
            args.name,
            args.token,
            args.reason,
            timeout=args.timeout,
            dp_ranks=getattr(args, "dp_ranks", None),
            guards=getattr(args, "guards", ()),
            window_s=getattr(args, "window", None),
        )

    return _remote(args, ask, print_control, control_exit_code)


def _remote(
    args: argparse.Namespace,
    ask: Callable[[], dict[str, Any]],
    show: Callable[[Mapping[str, Any], TextIO], None],
    exit_code: Callable[[Mapping[str, Any]], int],
) -> int:
    """A command against a running server: 2 if it cannot answer, else its report, as JSON or for humans."""
    from .._ops.remote import RemoteError

    try:
        report = ask()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            show(report, sys.stdout)
        return exit_code(report)
    except RemoteError as exc:
        print(f"vllm-custom-patches: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"vllm-custom-patches: internal error, please report it: {RemoteError(repr(exc))}", file=sys.stderr)
        return 2


def _sources(import_modules: bool) -> tuple[dict[str, str], dict[str, type[VLLMPatch[Any]] | PatchError]]:
    """Every visible patch name -> where it comes from, and (if imported) its class or load error."""
    sources: dict[str, str] = {}
    loaded: dict[str, type[VLLMPatch[Any]] | PatchError] = {}
    for name in PatchManager.names():
        sources[name] = "this program"
        loaded[name] = PatchManager.get(name)
    path_value = os.environ.get(ENV_PATH, "")
    if path_value.strip():
        before = set(PatchManager.names())
        result = load_path(path_value)
        for name in PatchManager.names():
            if name not in before:
                sources[name] = f"{ENV_PATH} ({PatchManager.get(name).__module__})"
                loaded[name] = PatchManager.get(name)
        for module, error in result.failed.items():
            sources[module] = f"{ENV_PATH} file"
            loaded[module] = error
        for refused in result.refused:
            sources[str(refused).split(":")[0]] = ENV_PATH
            loaded[str(refused).split(":")[0]] = refused
    for name, entry_point in sorted(find_entry_points().items()):
        dists = ", ".join(sorted({ep.dist.name if ep.dist else "?" for ep in entry_point.declared}))
        sources.setdefault(name, f"entry point ({dists})")
        if import_modules and name not in loaded:
            try:
                loaded[name] = entry_point.load()
            except PatchError as exc:
                loaded[name] = exc
    return sources, loaded


def _describe(row: _Row, patch_cls: type[VLLMPatch[Any]]) -> None:
    spec = patch_cls._vcp_spec
    gate = patch_cls._vcp_gate
    row.target = spec.target_label
    row.versions = str(gate) if gate is not None else ""
    row.description = spec.description.split("\n")[0]
    row.stackable, row.order, row.exclusive = spec.stackable, spec.order, sorted(spec.exclusive)


def _list(import_modules: bool) -> list[_Row]:
    sources, loaded = _sources(import_modules)
    rows = []
    for name, source in sources.items():
        row = _Row(name, source)
        found = loaded.get(name)
        if isinstance(found, PatchError):
            row.result, row.reason = "failed", str(found)
        elif found is not None:
            row.result = "loaded"
            _describe(row, found)
        else:
            row.result = "not imported"
        rows.append(row)
    specs = [found._vcp_spec for found in loaded.values() if not isinstance(found, PatchError)]
    # Overrides are known only where the target's module is imported already (status never imports).
    overrides = {status.name: status.overrides for status in PatchManager.status()}
    chains = preview_chains(specs, lambda spec: overrides.get(spec.name, ()))
    for row in rows:
        row.stacks = chains.get(row.name, [])
    return rows


def _check(names: list[str]) -> list[_Row]:
    sources, loaded = _sources(import_modules=False)
    explicit = set(names)
    if not names:
        selection = parse_selection(os.environ.get(ENV_PATCHES))
        explicit = set(selection.names)
        names = list(selection.names)
        if selection.empty or selection.all:
            names += [n for n in sorted(sources) if n not in explicit and n not in selection.excluded]
    entry_points = find_entry_points()
    rows = []
    for name in names:
        row = _Row(name, sources.get(name, "unknown"))
        rows.append(row)
        try:
            found = loaded.get(name)
            if isinstance(found, PatchError):
                raise found
            patch_cls = (
                found
                if found is not None
                else (entry_points[name].load() if name in entry_points else PatchManager.get(name))
            )
            _describe(row, patch_cls)
            PatchManager.apply(patch_cls)
        except PatchError as exc:
            # As the plugin decides: what '*' merely takes in is skipped where
            # it cannot apply; only a patch named explicitly fails.
            row.result, row.reason = ("failed" if name in explicit else "skipped"), str(exc)
        else:
            (status,) = [s for s in PatchManager.status() if s.name == patch_cls.name]
            row.result = "ok"
            row.overrides, row.additions = list(status.overrides), list(status.additions)
    # The stacks as the whole checked set forms them, once every patch had its turn.
    stacks = {status.name: list(status.stacks) for status in PatchManager.status()}
    for row in rows:
        if row.result == "ok":
            row.stacks = stacks.get(row.name, [])
    return rows


def _print_table(rows: list[_Row]) -> None:
    print(f"vLLM: {detect_vllm_version()}")
    if not rows:
        print("no patches found")
        return
    width = max(len(row.name) for row in rows)
    for row in rows:
        detail = row.reason
        if row.result in ("ok", "loaded"):
            parts = [row.target]
            if row.versions:
                parts.append(f"vLLM {row.versions}")
            if row.overrides:
                parts.append("overrides " + ", ".join(row.overrides))
            if row.additions:
                parts.append("adds " + ", ".join(row.additions))
            if row.stackable:
                parts.append("stackable" + (f" (order {row.order})" if row.order else ""))
            if row.exclusive:
                parts.append("exclusive " + ", ".join(row.exclusive))
            detail = "; ".join(parts)
        print(f"{row.name:<{width}}  {row.result.upper():<12}  {row.source}")
        if detail:
            print(f"{'':<{width}}  {detail}")
        for line in row.stacks:
            print(f"{'':<{width}}  stack {line}")
    failed = sum(row.result == "failed" for row in rows)
    print(f"{len(rows)} patch(es), {failed} failed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
