"""The plugin declares its variables to vLLM: ``--fail-on-environ-validation`` accepts them.

(tests/real_vllm/test_vllm_server.py runs its server with that flag.)  Here, in a
fresh process with the real ``vllm.envs``: what is declared, what enters vLLM's
compile-cache key, and that the validation still refuses a name nobody declared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from _early import SESSION_ENV, JobContext, early_fixture

pytestmark = pytest.mark.vllm

_CHILD = textwrap.dedent(
    """
    import json, os
    import vllm.envs as envs
    from vllm.platforms import current_platform
    from vllm_custom_patches.plugin import register

    before = set(envs.environment_variables)
    register()
    result = {"declared": sorted(set(envs.environment_variables) - before)}
    factors = envs.compile_factors()
    result["factors"] = {k: factors.get(k) for k in result["declared"]}
    current_platform.validate_environ(True)  # must not raise: every VLLM_* name is known now
    os.environ["VLLM_NOT_DECLARED_BY_ANYONE"] = "1"
    try:
        current_platform.validate_environ(True)
    except ValueError as exc:
        result["control"] = str(exc)
    print("RESULT " + json.dumps(result))
    """
)


@early_fixture
def environ_child(job: JobContext) -> subprocess.CompletedProcess[str]:
    """The child above, in a fresh process (an early job: it runs while the unit tests do)."""
    env = {k: v for k, v in SESSION_ENV.items() if not k.startswith(("VLLM_CUSTOM_PATCHES", "VLLM_PLUGINS"))}
    env.update(
        VLLM_CUSTOM_PATCHES="scheduler_trace",
        VLLM_CUSTOM_PATCHES_STRICT="1",
        VLLM_CUSTOM_PATCHES_TRACE_FILE=str(job.workspace.dir("environ") / "trace.jsonl"),
        VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S="5",
    )
    return job.run([sys.executable, "-c", _CHILD], env=env, timeout=180)


def test_register_declares_the_variables_set_and_only_the_selection_enters_the_compile_key(
    environ_child: subprocess.CompletedProcess[str],
) -> None:
    proc = environ_child
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    assert result["declared"] == [
        "VLLM_CUSTOM_PATCHES",
        "VLLM_CUSTOM_PATCHES_SPF_MAX_WAIT_S",
        "VLLM_CUSTOM_PATCHES_STRICT",
        "VLLM_CUSTOM_PATCHES_TRACE_FILE",
    ]
    # The selection and its patch's code are part of the torch.compile cache key (a patch may change
    # compiled code); the settings are present but constant: a per-run trace path never changes the key.
    # (tests/real_vllm/test_vllm_compile_key.py: the key follows the code.)
    assert result["factors"]["VLLM_CUSTOM_PATCHES"].startswith("scheduler_trace;scheduler_trace=sha256:")
    assert result["factors"]["VLLM_CUSTOM_PATCHES_TRACE_FILE"] == "set"
    assert "Unknown vLLM environment variable detected: VLLM_NOT_DECLARED_BY_ANYONE" in result["control"]
