"""Getting the comparison libraries that are not ordinary dependencies.

* ``gorilla`` comes from the ``bench`` extra (``pip install -e '.[bench]'``).
* ArcticInference is on PyPI only as an sdist whose build needs CUDA, so it
  cannot be installed here.  Its ``patching.py`` imports only the standard
  library, so the sdist is fetched with ``pip download --no-deps`` into
  ``benchmarks/.cache/`` (git-ignored), and just ``arctic_inference/__init__.py``
  (a licence header) and ``arctic_inference/patching.py`` are unpacked there
  and put on ``sys.path``.  Nothing of it is copied into the project.
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

from ._common import Unavailable

ARCTIC_VERSION = "0.3.0"
_ARCTIC_MEMBERS = ("arctic_inference/__init__.py", "arctic_inference/patching.py")

_arctic_info: dict[str, Any] = {}


def gorilla() -> ModuleType:
    try:
        import gorilla as module
    except ImportError as exc:
        raise Unavailable(f"gorilla not installed ({exc}); pip install -e '.[bench]'") from None
    return module


def _find_sdist(dest: Path) -> Path | None:
    found = sorted(dest.glob(f"arctic[_-]inference-{ARCTIC_VERSION}.tar.gz"))
    return found[0] if found else None


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist (no dependencies) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    base = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "arctic-inference",
        "--disable-pip-version-check",
        "--timeout",
        "20",
        "--retries",
        "1",
        "--dest",
        str(dest),
        f"arctic-inference=={ARCTIC_VERSION}",
    ]
    # pip prepares an sdist's metadata even when only downloading it.  Without
    # build isolation that reuses this venv's setuptools (fast, no extra
    # downloads); if that fails, let pip do it the standard way.
    error = ""
    for extra in (["--no-build-isolation"], []):
        try:
            proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            error = "pip download timed out"
            continue
        sdist = _find_sdist(dest)
        if sdist is not None:
            return sdist
        if proc.returncode == 0:
            error = f"pip reported success but left no sdist in {dest}"
        else:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
            error = lines[-1].strip() if lines else f"pip exited {proc.returncode}"
    raise Unavailable(f"pip download arctic-inference=={ARCTIC_VERSION} failed: {error}")


def _unpack(sdist: Path, into: Path) -> None:
    """Extract only the two files we need (by exact name: no path from the archive is trusted)."""
    with tarfile.open(sdist, "r:gz") as tar:
        # Members are matched by exact name below the sdist's single top folder.
        by_name = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile() and "/" in m.name}
        for member in _ARCTIC_MEMBERS:
            info = by_name.get(member)
            if info is None:
                raise Unavailable(f"{sdist.name} has no {member}")
            source = tar.extractfile(info)
            if source is None:
                raise Unavailable(f"{sdist.name}: {member} is not a regular file")
            target = into / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())


def arctic_patch(cache_dir: Path, offline: bool = False) -> type:
    """ArcticInference's ``ArcticPatch`` class, fetched into ``cache_dir`` if needed."""
    root = cache_dir / f"arctic_inference-{ARCTIC_VERSION}"
    if not all((root / m).is_file() for m in _ARCTIC_MEMBERS):
        sdist = _find_sdist(cache_dir / "downloads")
        if sdist is None:
            if offline:
                raise Unavailable(f"--offline, and arctic-inference=={ARCTIC_VERSION} is not in {cache_dir}")
            sdist = _download_sdist(cache_dir / "downloads")
        _unpack(sdist, root)
    sdist = _find_sdist(cache_dir / "downloads")
    if sdist is not None:
        _arctic_info["sdist_sha256"] = hashlib.sha256(sdist.read_bytes()).hexdigest()
    path = str(root)
    loaded = sys.modules.get("arctic_inference")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(path):
        raise Unavailable(f"another arctic_inference is already imported ({loaded!r})")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module("arctic_inference.patching")
    except Exception as exc:
        raise Unavailable(f"importing arctic_inference.patching failed: {exc!r}") from None
    _arctic_info.update(version=ARCTIC_VERSION, file=str(module.__file__))
    return module.ArcticPatch  # type: ignore[no-any-return]


def arctic_info() -> dict[str, Any]:
    return dict(_arctic_info)
