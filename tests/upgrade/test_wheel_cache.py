"""``doctor --vllm-source X.whl``: the unpacked tree is keyed by the wheel's bytes, and unpacking is bounded.

Hand-made wheels (``zipfile``) in a temporary directory; the limits are
lowered for the test so that a "bomb" stays small on disk and in time (the
mechanism is the same at the real limits).
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest

from vllm_custom_patches._cli import main as _cli
from vllm_custom_patches._upgrade import static as _static
from vllm_custom_patches._upgrade.static import load_tree


def _wheel(path: Path, files: dict[str, str | bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("vllm-1.0.dist-info/METADATA", "Name: vllm\n")
    return path


def _schedule(tree: _static.SourceTree) -> str:
    cls = tree.find_class("vllm.sched:Scheduler")
    assert cls is not None
    return cls.members["schedule"].source


def test_a_rebuilt_wheel_of_the_same_name_is_read_again(tmp_path: Path) -> None:
    whl = tmp_path / "vllm-1.0-py3-none-any.whl"
    old = "class Scheduler:\n    def schedule(self, budget):\n        return budget\n"
    new = "class Scheduler:\n    def schedule(self, budget):\n        return nobody\n"  # as long as the old
    _wheel(whl, {"vllm/__init__.py": "", "vllm/sched.py": old}, zipfile.ZIP_STORED)
    stamp = whl.stat()
    first = load_tree(whl)
    assert "return budget" in _schedule(first)
    assert load_tree(whl).root == first.root  # the same bytes: the same tree, not unpacked again
    # Rebuilt: same name, same size, even the same modification time (as a copy that keeps
    # times, or a reproducible build, gives): only the bytes differ.
    _wheel(whl, {"vllm/__init__.py": "", "vllm/sched.py": new}, zipfile.ZIP_STORED)
    os.utime(whl, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert whl.stat().st_size == stamp.st_size and whl.stat().st_mtime_ns == stamp.st_mtime_ns
    second = load_tree(whl)
    assert second.root != first.root
    assert "return nobody" in _schedule(second)
    # The tree of the bytes that are gone is removed; nothing half made is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([whl.name, second.root.name])


@pytest.mark.parametrize("limit", ["bytes", "files"])
def test_a_wheel_that_would_unpack_past_the_limit_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    monkeypatch.setattr(_static, "MAX_UNPACKED_BYTES", 1 << 20, raising=False)
    monkeypatch.setattr(
        _static, "MAX_UNPACKED_FILES", 10, raising=False
    )  # raising=False: without limits it fails below
    if limit == "bytes":
        # 4 MiB of source that compresses to a few KiB: a small wheel that expands past the limit.
        files: dict[str, str | bytes] = {"vllm/__init__.py": "", "vllm/big.py": b"#" * (4 << 20)}
    else:
        files = {"vllm/__init__.py": "", **{f"vllm/m{i}.py": "" for i in range(20)}}
    whl = _wheel(tmp_path / "vllm-1.0-py3-none-any.whl", files)
    assert whl.stat().st_size < 64 << 10
    with pytest.raises(ValueError) as caught:
        load_tree(whl)
    assert type(caught.value).__name__ == "WheelError"  # what the command turns into one line and exit 2
    message = str(caught.value)
    assert message.startswith(f"{whl}: refusing to unpack ") and "is it really a vLLM wheel?" in message
    assert f"over the limit of 10 files and {1 << 20} bytes" in message
    assert [p.name for p in tmp_path.iterdir()] == [whl.name]  # no tree, no temporary directory


def test_the_limit_holds_for_a_member_whose_header_understates_its_size(tmp_path: Path) -> None:
    """The limit is checked on the sizes the zip declares; a member that holds more than its
    declared size is cut there by zipfile, whose CRC check then refuses it: no more is written."""
    whl = _wheel(tmp_path / "vllm-1.0-py3-none-any.whl", {"vllm/__init__.py": "", "vllm/big.py": b"#" * (4 << 20)})
    data = bytearray(whl.read_bytes())
    with zipfile.ZipFile(whl) as zf:
        local = zf.getinfo("vllm/big.py").header_offset
    # Its uncompressed size, in its local header and in its central directory record: 100 bytes.
    struct.pack_into("<I", data, local + 22, 100)
    record = data.find(b"PK\x01\x02")
    while record != -1:
        name_len = struct.unpack_from("<H", data, record + 28)[0]
        if data[record + 46 : record + 46 + name_len] == b"vllm/big.py":
            struct.pack_into("<I", data, record + 24, 100)
        record = data.find(b"PK\x01\x02", record + 4)
    whl.write_bytes(bytes(data))
    with zipfile.ZipFile(whl) as zf:
        assert zf.getinfo("vllm/big.py").file_size == 100
    with pytest.raises(zipfile.BadZipFile):
        load_tree(whl)
    assert [p.name for p in tmp_path.iterdir()] == [whl.name]


def test_doctor_refuses_such_a_wheel_with_exit_2_naming_it_and_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_static, "MAX_UNPACKED_BYTES", 1 << 20, raising=False)
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES", raising=False)
    monkeypatch.delenv("VLLM_CUSTOM_PATCHES_PATH", raising=False)
    whl = _wheel(tmp_path / "vllm-1.0-py3-none-any.whl", {"vllm/__init__.py": "", "vllm/big.py": b"#" * (4 << 20)})
    assert _cli.main(["doctor", "no_such_patch", "--vllm-source", str(whl)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"vllm-custom-patches: {whl}: refusing to unpack 2 .py files of {(4 << 20)} bytes"), err
    assert f"over the limit of {getattr(_static, 'MAX_UNPACKED_FILES', None)} files and {1 << 20} bytes" in err, err
    assert [p.name for p in tmp_path.iterdir()] == [whl.name]
