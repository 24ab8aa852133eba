"""Rule 10: the core works where vLLM cannot be imported at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_define_apply_rollback_with_vllm_unimportable() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["vllm"] = None  # any "import vllm" now raises ImportError

        from vllm_custom_patches import PatchManager, VLLMPatch, detect_vllm_version

        class Target:
            def m(self):
                return 1

        class P(VLLMPatch[Target]):
            def m(self):
                return self._original_m() + 1

        assert P.apply() and Target().m() == 2
        assert PatchManager.rollback_all() == ["P"] and Target().m() == 1
        PatchManager.status()
        assert sys.modules["vllm"] is None
        assert not [m for m in sys.modules if m.startswith("vllm.")]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_the_package_imports_no_vllm_module() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, vllm_custom_patches; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
