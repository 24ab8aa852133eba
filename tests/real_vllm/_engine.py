"""Run real vLLM in fresh processes for the tests: engines, plugin loading, the OpenAI server.

This file is two things:

* a helper module the tests import (``run_child``, ``start_server``, ...),
  which never imports vLLM itself;
* the script those children run: ``python tests/real_vllm/_engine.py MODE SPEC OUT``
  reads a JSON spec, does the work and writes a JSON result.  Everything that
  starts an engine sits under the ``__main__`` guard, because vLLM starts its
  EngineCore and worker with ``spawn``, which imports this file again in each
  of them (as ``__mp_main__``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_custom_patches.testing._engine import _stop, _tail

HERE = Path(__file__).resolve()

#: Engine arguments of every test engine, on top of the tiny model's
#: ENGINE_KWARGS: one request at a time, so the admission order is the order
#: requests are served and finish in; no prefix caching, so repeated prompts
#: compute exactly the same way in every phase.
TEST_ENGINE_ARGS: dict[str, Any] = {"max_num_seqs": 1, "enable_prefix_caching": False}

#: The requests the shortest-prompt-first tests submit, in this order: (id, prompt length, max_tokens).
#: "head" is shortest, so every policy admits it first; the others are then
#: ordered by the policy.  Where requests reach the engine one by one (a
#: server, the multiprocess engine), the tests hold them at the test-only
#: AdmissionGate (_admission_gate.py) until all have arrived, so the order
#: never depends on how fast the engine runs.
SPF_REQUESTS = [("head", 3, 24), ("long", 40, 3), ("tiny", 5, 3), ("medium", 20, 3), ("short", 10, 3)]

#: The requests the fair-share tests submit, in this order: tenant a's burst, then tenant b's.
TENANT_REQUESTS = [(f"{tenant}{i}", 8, tenant) for tenant in "ab" for i in range(4)]


def prompt_ids(index: int, length: int) -> list[int]:
    """A deterministic prompt of ``length`` token ids, different for each ``index``."""
    return [10 + (index * 37 + k * 13) % 980 for k in range(length)]


def user_id(internal_id: str) -> str:
    """vLLM's internal request id is the caller's id plus ``-`` and 8 random characters."""
    return internal_id.rsplit("-", 1)[0]


# -- running children ----------------------------------------------------------


class ChildFailed(AssertionError):
    pass


def clean_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` without any ``VLLM_CUSTOM_PATCHES*``/``VLLM_PLUGINS`` setting, plus ``extra``."""
    env = {k: v for k, v in base.items() if not k.startswith(("VLLM_CUSTOM_PATCHES", "VLLM_PLUGINS"))}
    env.update(extra)
    return env


@dataclass
class Child:
    """A started child process of this script."""

    proc: subprocess.Popen[bytes]
    out: Path
    log: Path
    started: float

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(self.proc)
            raise ChildFailed(f"child timed out after {timeout:.0f}s; log tail:\n{tail(self.log)}") from None
        if self.proc.returncode != 0 or not self.out.exists():
            raise ChildFailed(f"child exited with {self.proc.returncode}; log tail:\n{tail(self.log)}")
        result: dict[str, Any] = json.loads(self.out.read_text())
        result["elapsed_s"] = time.monotonic() - self.started
        result["log"] = str(self.log)
        return result


def start_child(mode: str, spec: Mapping[str, Any], env: Mapping[str, str], workdir: Path) -> Child:
    """Start ``python _engine.py MODE SPEC OUT`` in its own session; stdout+stderr go to a log file."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out, log = workdir / "spec.json", workdir / "result.json", workdir / "child.log"
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(HERE), mode, str(spec_path), str(out)],
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(proc, out, log, time.monotonic())


def run_child(
    mode: str, spec: Mapping[str, Any], env: Mapping[str, str], workdir: Path, timeout: float = 600
) -> dict[str, Any]:
    return start_child(mode, spec, env, workdir).result(timeout)


# The kit's own process handling (vllm_custom_patches.testing runs engines the same way).
tail = _tail
_stop_group = _stop


# -- the OpenAI-compatible server ----------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    model: str
    log: Path
    ready_s: float
    trace: Path | None = None
    """The trace file its patches append to, if any (set by the caller)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model: str, env: Mapping[str, str], log: Path, timeout: float = 600, extra_args: Sequence[str] = ()
) -> Server:
    """Start ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 and wait until /v1/models answers."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--load-format", "dummy", "--max-model-len", "128",
        "--enforce-eager", "--dtype", "float32", "--max-num-seqs", "1",
        "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port), *extra_args,
    ]  # fmt: skip
    started = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, port, model, log, 0.0)
    try:
        while True:
            if proc.poll() is not None:
                raise ChildFailed(f"vLLM server exited with {proc.returncode} during start-up:\n{tail(log)}")
            if time.monotonic() - started > timeout:
                raise ChildFailed(f"vLLM server not ready after {timeout:.0f}s:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{server.base_url}/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
    except BaseException:
        _stop_group(proc)
        raise
    server.ready_s = time.monotonic() - started
    return server


def stop_server(server: Server, grace: float = 30) -> float:
    """SIGTERM the server's pid; return how long it took to exit (``grace`` + ... if it had to be killed)."""
    started = time.monotonic()
    _stop_group(server.proc, grace)
    return time.monotonic() - started


@contextlib.contextmanager
def running_server(model: str, env: Mapping[str, str], log: Path) -> Iterator[Server]:
    server = start_server(model, env, log)
    try:
        yield server
    finally:
        stop_server(server)


# -- a worker-side patch -----------------------------------------------------------

#: A patch on vLLM's CPU worker, loaded through VLLM_CUSTOM_PATCHES_PATH: each
#: time the model executes it appends the worker's rank and pid to
#: $VCP_RANK_WITNESS_FILE, from inside the worker process.  Two ways to make it
#: fail in one process only (vLLM names its workers VllmWorker-<rank>):
#:
#: * in the process named $VCP_BREAK_IN_PROCESS, something else has already
#:   changed the target at start-up (an attribute under the name the patch keeps
#:   its original in), so the patch cannot be applied there;
#: * in the process named $VCP_TAMPER_IN_PROCESS, while the file
#:   $VCP_TAMPER_FILE exists, another tool wraps the patched method (as a
#:   profiler would) at the next model step, so the patch cannot be rolled back
#:   there; when the file is gone, that tool unwraps itself at the next step.
RANK_WITNESS_PATCH = '''
import json
import multiprocessing
import os

from typing_extensions import override

from vllm_custom_patches import VLLMPatch

_HERE = multiprocessing.current_process().name

if _HERE == os.environ.get("VCP_BREAK_IN_PROCESS"):
    from vllm.v1.worker.cpu_worker import CPUWorker

    CPUWorker._original_execute_model = CPUWorker.execute_model  # an outside change, in this process only


def _outside_tool(cls):
    marker = os.environ.get("VCP_TAMPER_FILE", "")
    current = cls.__dict__["execute_model"]
    if _HERE != os.environ.get("VCP_TAMPER_IN_PROCESS") or not os.path.exists(marker):
        return
    if getattr(current, "__name__", "") == "outside_wrapper":
        return

    def outside_wrapper(self, scheduler_output):
        if not os.path.exists(marker):
            cls.execute_model = current  # the tool removes itself
        return current(self, scheduler_output)

    cls.execute_model = outside_wrapper


class RankWitness(VLLMPatch["vllm.v1.worker.cpu_worker:CPUWorker"]):
    """Appends the worker's rank and pid to a file each time the model executes."""

    @override
    def execute_model(self, scheduler_output):
        _outside_tool(type(self))
        with open(os.environ["VCP_RANK_WITNESS_FILE"], "a") as out:
            out.write(json.dumps({"rank": self.rank, "local_rank": self.local_rank, "pid": os.getpid()}) + "\\n")
        return RankWitness.original("execute_model")(self, scheduler_output)
'''


def write_patch_file(directory: Path, name: str, source: str) -> Path:
    """Write patch file ``name`` into ``directory`` (made for VLLM_CUSTOM_PATCHES_PATH); return the directory.

    The modes are set, not left to the umask: the plugin refuses a directory or
    file that group or others can write.
    """
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / name
    path.write_text(source, encoding="utf-8")
    path.chmod(0o644)
    return directory


def write_rank_witness(directory: Path) -> Path:
    """Write the RankWitness patch file into ``directory`` (made for VLLM_CUSTOM_PATCHES_PATH); return it."""
    return write_patch_file(directory, "rank_witness.py", RANK_WITNESS_PATCH)


# -- vllm serve (vLLM's own CLI), several processes and nodes ----------------------

VLLM_CLI = HERE.parent / "_vllm_cli.py"

#: The flags every ``vllm serve`` of the tests gets (tiny model, CPU, one request at a time).
SERVE_FLAGS = [
    "--load-format", "dummy", "--max-model-len", "128", "--enforce-eager", "--dtype", "float32",
    "--max-num-seqs", "1", "--no-enable-prefix-caching",
]  # fmt: skip


def launch_serve(model: str, env: Mapping[str, str], log: Path, args: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start ``vllm serve MODEL ...`` (vLLM's CLI, see ``_vllm_cli.py``) in its own session; do not wait."""
    with open(log, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, str(VLLM_CLI), "serve", model, *SERVE_FLAGS, *args],
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(port: int, procs: Mapping[Path, subprocess.Popen[bytes]], timeout: float = 600) -> float:
    """Wait until ``/v1/models`` answers on ``port``; fail early, with its log, if any process exits."""
    started = time.monotonic()
    while True:
        for log, proc in procs.items():
            if proc.poll() is not None:
                raise ChildFailed(
                    f"vLLM process exited with {proc.returncode} during start-up ({log.name}):\n{tail(log)}"
                )
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {log.name}\n{tail(log)}" for log in procs)
            raise ChildFailed(f"vLLM server not ready after {timeout:.0f}s:\n{logs}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except urllib.error.HTTPError as exc:  # 401: up, with an API key
            if exc.code == 401:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)


# -- what the children do ------------------------------------------------------


def _process_tree() -> list[dict[str, Any]]:
    import psutil

    tree = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            tree.append(
                {"pid": proc.pid, "ppid": proc.ppid(), "name": proc.name(), "cmdline": " ".join(proc.cmdline())}
            )
    return tree


def _status() -> dict[str, dict[str, Any]]:
    from vllm_custom_patches import PatchManager

    return {s.name: s.as_dict() for s in PatchManager.status()}


def _engine_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Start one engine, run the spec's phases on it, report what happened."""
    import importlib

    import vllm

    from vllm_custom_patches import PatchManager
    from vllm_custom_patches.testing import ENGINE_KWARGS

    for name in spec.get("import", []):
        importlib.import_module(f"vllm_custom_patches_catalogue.{name}")
    llm = vllm.LLM(model=spec["model"], skip_tokenizer_init=True, **ENGINE_KWARGS, **TEST_ENGINE_ARGS)
    engine = llm.llm_engine
    result: dict[str, Any] = {"pid": os.getpid(), "phases": {}, "processes": _process_tree()}
    for phase in spec["phases"]:
        for name in phase.get("rollback", []):
            PatchManager.rollback(name)
        for name in phase.get("apply", []):
            PatchManager.apply(name)
        tag = phase["name"]
        for index, request in enumerate(phase["requests"]):
            params = vllm.SamplingParams(
                temperature=0,
                max_tokens=request.get("max_tokens", 3),
                ignore_eos=True,
                extra_args={"tenant": request["tenant"]} if "tenant" in request else None,
            )
            engine.add_request(
                f"{tag}:{request['id']}", {"prompt_token_ids": prompt_ids(index, request["len"])}, params
            )
        finished: list[str] = []
        outputs: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    rid = output.request_id.split(":", 1)[1]
                    finished.append(rid)
                    outputs[rid] = list(output.outputs[0].token_ids)
        result["phases"][tag] = {"finished": finished, "outputs": outputs, "applied": PatchManager.applied()}
    result["status"] = _status()
    return result


def _plugins_main(spec: dict[str, Any]) -> dict[str, Any]:
    """What vLLM does in each process it starts: load the general plugins; then import the scheduler."""
    result: dict[str, Any] = {"pid": os.getpid()}
    try:
        import vllm.plugins

        vllm.plugins.load_general_plugins()
        result["after_plugins"] = _status()
        result["scheduler_imported_by_plugins"] = "vllm.v1.core.sched.scheduler" in sys.modules
        from vllm.v1.core.sched.scheduler import Scheduler

        result["after_import"] = _status()
        result["scheduler_members"] = {
            name: getattr(vars(Scheduler).get(name), "__module__", None)
            for name in ("__init__", "schedule", "_update_after_schedule")
        }
    except Exception as exc:
        result["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "mro": [c.__name__ for c in type(exc).__mro__],
        }
    from vllm_custom_patches import PatchManager

    result["applied"] = PatchManager.applied()
    return result


def main(argv: list[str]) -> int:
    mode, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = {"engine": _engine_main, "plugins": _plugins_main}[mode](spec)
    Path(out_path + ".tmp").write_text(json.dumps(result))
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
