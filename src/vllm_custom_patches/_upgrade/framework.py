"""``doctor`` checks the framework itself: the vLLM integration points it relies on, in the checked vLLM.

A patch can be fine on a new vLLM while the framework around it is not: the
plugin never runs, the status route is not mounted, the kill switch cannot
reach an engine core.  So ``doctor`` reads, from the source of the vLLM it
checks (an unpacked wheel, a source tree, or the installed vLLM's files: never
imported), every point of vLLM this package uses:

* general plugins (``vllm/plugins/__init__.py``): ``load_general_plugins`` reads
  the group our entry point is in (``vllm.general_plugins``) and calls each
  plugin with no argument (``plugin.register()`` takes none), and it is called
  where the framework must run: ``EngineCore.__init__`` (patches of the
  scheduler, the engine core's status and control methods) and
  ``WorkerWrapperBase.init_worker`` (patches of workers and models);
* the endpoint plugin (``vllm/plugins/endpoint_plugins/interface.py``):
  the group ``vllm.endpoint_plugins`` is read, ``EndpointPlugin`` asks for
  nothing ``CustomPatchesEndpoint`` (``endpoint.py``) lacks, our
  ``attach_router``/``init_state`` accept its calls, and vLLM still calls them;
* the engine core (``vllm/v1/engine/core.py``): ``EngineCore`` exists (the
  plugin gives it ``vllm_custom_patches_status``/``_control``), sets
  ``vllm_config`` and ``model_executor`` (read by those methods), and a
  ``_handle_client_request`` looks utility methods up by name with
  ``getattr``; ``Executor.collective_rpc(method, timeout=, args=)``
  (``vllm/v1/executor/abstract.py``) reaches the workers;
* the workers (``vllm/v1/worker/worker_base.py``): ``WorkerWrapperBase``
  exists (it gets the same two methods), sets ``vllm_config`` and
  ``rpc_rank``, and RPCs are run by name (``run_method``, ``getattr``);
* the engine client (``vllm/v1/engine/async_llm.py``,
  ``core_client.py``): ``AsyncLLM.engine_core``,
  ``call_utility_async(method, *args)``, ``_call_utility_async(method,
  *args, engine=)`` and ``core_engines`` (one call per data-parallel rank);
* ``vllm.envs``: the table ``environment_variables`` (the plugin declares
  its settings there, for ``--fail-on-environ-validation``, whose check reads
  it) and ``compile_factors`` hashing it (the compile-cache key carries the
  selected patches' code: ``_runtime.compile_key``);
* Ray (``vllm/ray/ray_env.py``): ``get_env_vars_to_copy`` copies ``VLLM_*``
  variables, so the settings reach remote workers;
* the rest the framework reads with a fallback: ``vllm.logger``'s bootstrap
  configuration (the plugin's summary line), ``parallel_state``'s groups and
  ``ParallelConfig``'s sizes and data-parallel rank (the ranks a status reports).

A point the framework calls or sets that is gone, or whose signature no
longer takes the framework's call, is an error; a changed body that the
framework depends on (a call site, a lookup by name, a group name), when this
reading can tell, is a warning; so is the loss of something the framework
reads with a fallback.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .signatures import describe, incompatibilities, signature_from_ast
from .static import SourceTree, StaticClass

__all__ = [
    "ENDPOINT_CLASS",
    "ENDPOINT_GROUP",
    "GENERAL_GROUP",
    "RESPONDER_CLASSES",
    "Problem",
    "check_framework",
    "installed_tree",
]

GENERAL_GROUP = "vllm.general_plugins"
"""The entry-point group of ``plugin:register`` (pyproject.toml)."""
ENDPOINT_GROUP = "vllm.endpoint_plugins"
"""The entry-point group of ``endpoint:CustomPatchesEndpoint`` (pyproject.toml)."""
ENDPOINT_CLASS = "vllm_custom_patches.endpoint:CustomPatchesEndpoint"

_PLUGINS = "vllm.plugins"
_INTERFACE = "vllm.plugins.endpoint_plugins.interface"
_ENGINE_CORE = "vllm.v1.engine.core:EngineCore"
_WORKER = "vllm.v1.worker.worker_base:WorkerWrapperBase"
# What _ops.agent installs its methods on (tests/upgrade/test_framework.py keeps the two in step).
RESPONDER_CLASSES = (_ENGINE_CORE, _WORKER)


@dataclass(frozen=True)
class Problem:
    """One integration point that does not hold: doctor reports it as a ``framework`` finding."""

    severity: str
    """``error`` or ``warning``."""
    where: str
    """The point in vLLM: ``module:Qual.member`` or ``module.function``."""
    message: str


def installed_tree() -> SourceTree | None:
    """The installed vLLM's source, read as files (``vllm`` is not imported); ``None`` if there is none."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return SourceTree(Path(next(iter(spec.submodule_search_locations))).parent)


def check_framework(tree: SourceTree, endpoint: SourceTree | None = None) -> list[Problem]:
    """Every integration point of the framework that does not hold in the vLLM under ``tree``.

    ``endpoint``: where ``vllm_custom_patches/endpoint.py`` is read from
    (default: this package's own file); tests give hand-made ones.
    """
    reader = _Reader(tree)
    ours = _Reader(endpoint or _own_tree())
    problems: list[Problem] = []
    for check in _CHECKS:
        problems += check(reader, ours)
    return problems


def _own_tree() -> SourceTree:
    return SourceTree(Path(__file__).resolve().parents[2])


# -- reading vLLM's source ------------------------------------------------------------------


class _Reader:
    """Module-level functions and assignments, classes and their members, of one source tree."""

    def __init__(self, tree: SourceTree) -> None:
        self.tree = tree
        self._modules: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._modules:
            path = self.tree.module_path(name)
            try:
                self._modules[name] = None if path is None else ast.parse(path.read_text(encoding="utf-8"), str(path))
            except (OSError, SyntaxError, UnicodeDecodeError):
                self._modules[name] = None
        return self._modules[name]

    def function(self, module: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        """The module-level ``def name`` (the last one, as Python binds it; also under ``if``/``try``)."""
        found = None
        for stmt in _top_level(self.module(module)):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                found = stmt
        return found

    def assigns(self, module: str, name: str) -> bool:
        """Whether ``module`` binds ``name`` at module level by an assignment."""
        for stmt in _top_level(self.module(module)):
            targets = (
                stmt.targets
                if isinstance(stmt, ast.Assign)
                else [stmt.target]
                if isinstance(stmt, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        return False

    def cls(self, label: str) -> StaticClass | None:
        try:
            return self.tree.find_class(label)
        except (OSError, SyntaxError, UnicodeDecodeError):
            return None

    def method(self, label: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        """``name`` as instances of the class ``label`` find it (inherited ones too), if it is a function."""
        cls = self.cls(label)
        found = None if cls is None else self.tree.lookup(cls, name)
        node = None if found is None else found[1].node
        return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None

    def sets_on_self(self, label: str, attribute: str) -> bool:
        """Whether a method of the class ``label`` or of its bases assigns ``self.<attribute>``."""
        cls = self.cls(label)
        for holder in self.tree.mro(cls) if cls is not None else []:
            for member in holder.members.values():
                if member.kind != "attribute" and _assigns_self(member.node, attribute):
                    return True
            if attribute in holder.members and holder.members[attribute].kind == "attribute":
                return True  # a class-level default, which instances read the same way
        return False


def _top_level(module: ast.Module | None) -> Iterator[ast.stmt]:
    todo = list(module.body) if module is not None else []
    while todo:
        stmt = todo.pop(0)
        if isinstance(stmt, (ast.If, ast.Try)):
            todo[:0] = [*stmt.body, *(s for h in getattr(stmt, "handlers", []) for s in h.body), *stmt.orelse,
                        *getattr(stmt, "finalbody", [])]  # fmt: skip
        else:
            yield stmt


def _assigns_self(node: ast.AST, attribute: str) -> bool:
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.ctx, ast.Store)
            and sub.attr == attribute
            and isinstance(sub.value, ast.Name)
            and sub.value.id == "self"
        ):
            return True
    return False


def _calls(node: ast.AST | None, name: str) -> bool:
    """Whether ``node`` calls something named ``name`` (``name(...)`` or ``x.name(...)``)."""
    for sub in ast.walk(node) if node is not None else []:
        if isinstance(sub, ast.Call):
            func = sub.func
            if (isinstance(func, ast.Name) and func.id == name) or (
                isinstance(func, ast.Attribute) and func.attr == name
            ):
                return True
    return False


def _getattr_on(node: ast.AST | None, owner: str | None = None) -> bool:
    """Whether ``node`` calls ``getattr(x, <not a constant>)`` (on ``owner`` if given): a lookup by a name it was sent."""
    for sub in ast.walk(node) if node is not None else []:
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Name)
            and sub.func.id == "getattr"
            and len(sub.args) >= 2
            and not isinstance(sub.args[1], ast.Constant)
        ):
            first = sub.args[0]
            if owner is None or (isinstance(first, ast.Name) and first.id == owner):
                return True
    return False


def _takes(node: ast.FunctionDef | ast.AsyncFunctionDef, *args: Any, **kwargs: Any) -> bool:
    """Whether a call with these arguments binds to the function's parameters."""
    try:
        signature_from_ast(node).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _text(reader: _Reader, module: str) -> str:
    tree = reader.module(module)
    return "" if tree is None else ast.unparse(tree)


# -- the integration points ------------------------------------------------------------------

_Check = Callable[[_Reader, _Reader], list[Problem]]


def _general_plugins(vllm: _Reader, ours: _Reader) -> list[Problem]:
    where = f"{_PLUGINS}.load_general_plugins"
    load = vllm.function(_PLUGINS, "load_general_plugins")
    if load is None:
        return [Problem("error", where, "vLLM has no vllm.plugins.load_general_plugins: it would never run the "
                        "general plugin custom_patches, so no patch is applied and no process answers for status")]  # fmt: skip
    out = []
    if GENERAL_GROUP not in _constants(vllm.module(_PLUGINS)):
        out.append(Problem("error", f"{_PLUGINS}", f"vllm/plugins/__init__.py no longer names the entry-point group "
                           f"{GENERAL_GROUP!r}, where the plugin is registered: vLLM would not load it"))  # fmt: skip
    calls = _loop_variable_calls(load)
    if any(c.args or c.keywords for c in calls):
        out.append(Problem("error", where, "load_general_plugins calls each plugin with arguments; the plugin's "
                           "register() takes none, so every vLLM process would fail at start-up"))  # fmt: skip
    elif not calls:
        out.append(Problem("warning", where, "cannot tell how load_general_plugins calls each plugin (no call of "
                           "a loop variable): the plugin's register() must be called with no argument"))  # fmt: skip
    for label, member, role in (
        (_ENGINE_CORE, "__init__", "engine-core processes (scheduler patches, status and kill switch there)"),
        (_WORKER, "init_worker", "worker processes (worker and model patches, their status and kill switch)"),
    ):
        if vllm.cls(label) is None:
            continue  # the class itself is gone: its own check says so
        node = vllm.method(label, member)
        if node is not None and not _calls(node, "load_general_plugins"):
            out.append(Problem("warning", f"{label}.{member}", f"{label.split(':')[1]}.{member} no longer calls "
                               f"load_general_plugins: the plugin may not run in {role}"))  # fmt: skip
        elif node is None:
            out.append(Problem("warning", f"{label}.{member}", f"{label} has no {member}, where vLLM ran the general "
                               f"plugins: the plugin may not run in {role}"))  # fmt: skip
    return out


def _loop_variable_calls(node: ast.AST) -> list[ast.Call]:
    """Calls of a ``for`` loop's variable (``for func in plugins.values(): func()``) inside ``node``."""
    names = {t.id for loop in ast.walk(node) if isinstance(loop, ast.For) for t in ast.walk(loop.target)
             if isinstance(t, ast.Name)}  # fmt: skip
    return [
        c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in names
    ]


def _constants(module: ast.Module | None) -> set[str]:
    return (
        {n.value for n in ast.walk(module) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        if module
        else set()
    )


def _endpoint_plugins(vllm: _Reader, ours: _Reader) -> list[Problem]:
    out = []
    if vllm.module(_PLUGINS) is not None and ENDPOINT_GROUP not in _constants(vllm.module(_PLUGINS)):
        out.append(Problem("error", _PLUGINS, f"vllm/plugins/__init__.py no longer names the entry-point group "
                           f"{ENDPOINT_GROUP!r}: GET /custom_patches and the kill switch's routes would not be "
                           "mounted"))  # fmt: skip
    protocol = vllm.cls(f"{_INTERFACE}:EndpointPlugin")
    if protocol is None:
        return [*out, Problem("error", f"{_INTERFACE}:EndpointPlugin", "vLLM has no EndpointPlugin "
                              f"({_INTERFACE}): the endpoint plugin custom_patches (GET /custom_patches, the kill "
                              "switch) is not mounted")]  # fmt: skip
    mine = ours.cls(ENDPOINT_CLASS)
    if mine is None:
        return [*out, Problem("error", ENDPOINT_CLASS, f"{ENDPOINT_CLASS} cannot be read")]
    for name, member in sorted(protocol.members.items()):
        if name.startswith("_"):
            continue
        where = f"{_INTERFACE}:EndpointPlugin.{name}"
        if ours.tree.lookup(mine, name) is None and not ours.sets_on_self(ENDPOINT_CLASS, name):
            out.append(Problem("error", where, f"EndpointPlugin asks for {name!r}, which CustomPatchesEndpoint lacks: "
                               "vLLM would fail to mount or call it"))  # fmt: skip
            continue
        theirs, own = member.node, ours.method(ENDPOINT_CLASS, name)
        if isinstance(theirs, (ast.FunctionDef, ast.AsyncFunctionDef)) and own is not None:
            expected, actual = signature_from_ast(theirs), signature_from_ast(own)
            for problem in incompatibilities(expected, actual):
                out.append(Problem("error", where, f"CustomPatchesEndpoint.{name}{describe(actual)} cannot take every "
                                   f"call EndpointPlugin.{name}{describe(expected)} allows: {problem}"))  # fmt: skip
            if isinstance(theirs, ast.AsyncFunctionDef) != isinstance(own, ast.AsyncFunctionDef):
                kind = "a coroutine" if isinstance(theirs, ast.AsyncFunctionDef) else "a plain function"
                out.append(Problem("error", where, f"EndpointPlugin.{name} is now {kind}; "
                                   f"CustomPatchesEndpoint.{name} is not"))  # fmt: skip
    for function, method in (
        ("attach_endpoint_plugins", "attach_router"),
        ("init_endpoint_plugins_state", "init_state"),
    ):
        node = vllm.function(_INTERFACE, function)
        if node is None or not _calls(node, method):
            out.append(Problem("warning", f"{_INTERFACE}.{function}", f"{_INTERFACE}.{function} "
                               f"{'is gone' if node is None else f'no longer calls {method}'}: vLLM may no longer "
                               f"call an endpoint plugin's {method} as before"))  # fmt: skip
    return out


def _engine_core(vllm: _Reader, ours: _Reader) -> list[Problem]:
    if vllm.cls(_ENGINE_CORE) is None:
        return [Problem("error", _ENGINE_CORE, "vLLM has no EngineCore in vllm/v1/engine/core.py: the plugin cannot "
                        "give it the status and control methods, so GET /custom_patches and the kill switch reach no "
                        "engine core")]  # fmt: skip
    out = []
    for attribute in ("vllm_config", "model_executor"):
        if not vllm.sets_on_self(_ENGINE_CORE, attribute):
            out.append(Problem("error", f"{_ENGINE_CORE}.{attribute}", f"EngineCore no longer sets {attribute}, which "
                               "its status and control methods read"))  # fmt: skip
    module = vllm.module(_ENGINE_CORE.partition(":")[0])
    handlers = [n for n in ast.walk(module) if isinstance(n, ast.FunctionDef) and n.name == "_handle_client_request"] if module else []  # fmt: skip
    if not any(_getattr_on(h, "self") for h in handlers):
        out.append(Problem("warning", f"{_ENGINE_CORE.partition(':')[0]}._handle_client_request",
                           "no _handle_client_request in vllm/v1/engine/core.py looks utility methods up by name "
                           "(getattr(self, name)): the engine core may not find vllm_custom_patches_status/_control"))  # fmt: skip
    rpc = vllm.method("vllm.v1.executor.abstract:Executor", "collective_rpc")
    where = "vllm.v1.executor.abstract:Executor.collective_rpc"
    if rpc is None:
        out.append(Problem("error", where, "vLLM's Executor has no collective_rpc: an engine core cannot ask its "
                           "workers for their status or change their patches"))  # fmt: skip
    elif not _takes(rpc, "executor", "vllm_custom_patches_status", timeout=5.0, args=()):
        out.append(Problem("error", where, f"Executor.collective_rpc{describe(signature_from_ast(rpc))} no longer takes "
                           "(method, timeout=..., args=...), as the engine core's status and control methods call it"))  # fmt: skip
    return out


def _workers(vllm: _Reader, ours: _Reader) -> list[Problem]:
    if vllm.cls(_WORKER) is None:
        return [Problem("error", _WORKER, "vLLM has no WorkerWrapperBase in vllm/v1/worker/worker_base.py: the plugin "
                        "cannot give workers their status and control methods")]  # fmt: skip
    out = []
    for attribute in ("vllm_config", "rpc_rank"):
        if not vllm.sets_on_self(_WORKER, attribute):
            out.append(Problem("warning", f"{_WORKER}.{attribute}", f"WorkerWrapperBase no longer sets {attribute}, which "
                               "a worker's status reads for its ranks"))  # fmt: skip
    run = vllm.function("vllm.v1.serial_utils", "run_method")
    if run is None or not _getattr_on(run):
        out.append(Problem("warning", "vllm.v1.serial_utils.run_method", "vllm.v1.serial_utils.run_method "
                           f"{'is gone' if run is None else 'no longer looks a method up by name (getattr)'}: workers "
                           "may not run collective_rpc('vllm_custom_patches_status') by name"))  # fmt: skip
    return out


def _engine_client(vllm: _Reader, ours: _Reader) -> list[Problem]:
    out = []
    llm = "vllm.v1.engine.async_llm:AsyncLLM"
    if not vllm.sets_on_self(llm, "engine_core"):
        out.append(Problem("error", f"{llm}.engine_core", "AsyncLLM (the API server's engine client) has no engine_core: "
                           "GET /custom_patches and the kill switch cannot reach the engine cores"))  # fmt: skip
    client = "vllm.v1.engine.core_client:AsyncMPClient"
    call = vllm.method(client, "call_utility_async")
    if call is None or not _takes(call, "client", "vllm_custom_patches_status", "a", "b"):
        shown = "is gone" if call is None else f"{describe(signature_from_ast(call))} no longer takes (method, *args)"
        out.append(Problem("error", f"{client}.call_utility_async", f"AsyncMPClient.call_utility_async {shown}: the "
                           "status route and the kill switch call the engine cores through it"))  # fmt: skip
    each = vllm.method(client, "_call_utility_async")
    if each is None:
        out.append(Problem("warning", f"{client}._call_utility_async", "AsyncMPClient._call_utility_async is gone: "
                           "the status route and the kill switch reach only the first engine core of a data-parallel "
                           "server"))  # fmt: skip
    elif not _takes(each, "client", "vllm_custom_patches_status", "a", engine=b"\0\0"):
        out.append(Problem("error", f"{client}._call_utility_async", "AsyncMPClient._call_utility_async"
                           f"{describe(signature_from_ast(each))} no longer takes (method, *args, engine=...), as the "
                           "status route and the kill switch call it once per engine core"))  # fmt: skip
    if not vllm.sets_on_self(client, "core_engines"):
        out.append(Problem("warning", f"{client}.core_engines", "the engine client no longer has core_engines: the "
                           "status route and the kill switch reach only one engine core"))  # fmt: skip
    return out


def _envs(vllm: _Reader, ours: _Reader) -> list[Problem]:
    module = "vllm.envs"
    if vllm.module(module) is None:
        return [Problem("error", module, "vLLM has no vllm/envs.py: the plugin cannot declare its settings to vLLM")]
    out = []
    if not vllm.assigns(module, "environment_variables"):
        out.append(Problem("error", f"{module}.environment_variables", "vllm.envs has no environment_variables table: "
                           "the plugin cannot declare its VLLM_CUSTOM_PATCHES* settings (--fail-on-environ-validation "
                           "refuses them) nor put the selected patches' code into the compile-cache key"))  # fmt: skip
    factors = vllm.function(module, "compile_factors")
    if factors is None or "environment_variables" not in ast.unparse(factors):
        out.append(Problem("warning", f"{module}.compile_factors", f"vllm.envs.compile_factors "
                           f"{'is gone' if factors is None else 'no longer reads environment_variables'}: the "
                           "torch.compile cache key may not include the selected patches' code, so an artifact "
                           "compiled with another version of a patch could be reused"))  # fmt: skip
    validate = vllm.method("vllm.platforms.interface:Platform", "validate_environ")
    if validate is not None and "environment_variables" not in ast.unparse(validate):
        out.append(Problem("warning", "vllm.platforms.interface:Platform.validate_environ", "Platform.validate_environ "
                           "no longer checks VLLM_* names against environment_variables: declaring the settings there "
                           "may not keep --fail-on-environ-validation from refusing them"))  # fmt: skip
    return out


def _ray(vllm: _Reader, ours: _Reader) -> list[Problem]:
    module = "vllm.ray.ray_env"
    copy = vllm.function(module, "get_env_vars_to_copy")
    if copy is None:
        return [Problem("warning", f"{module}.get_env_vars_to_copy", "vllm/ray/ray_env.py get_env_vars_to_copy is "
                        "gone: with the Ray executor, VLLM_CUSTOM_PATCHES* may not reach the workers on other nodes")]  # fmt: skip
    if "VLLM_" not in _constants(vllm.module(module)) and "environment_variables" not in ast.unparse(copy):
        return [Problem("warning", f"{module}.get_env_vars_to_copy", "get_env_vars_to_copy copies neither VLLM_* "
                        "variables nor vllm.envs' table: VLLM_CUSTOM_PATCHES* may not reach Ray workers")]  # fmt: skip
    return []


def _fallbacks(vllm: _Reader, ours: _Reader) -> list[Problem]:
    out = []
    if vllm.module("vllm.logger") is not None and vllm.function("vllm.logger", "_configure_vllm_root_logger") is None:
        out.append(Problem("warning", "vllm.logger._configure_vllm_root_logger", "vllm.logger has no "
                           "_configure_vllm_root_logger: the plugin's summary line may be lost in vLLM's main "
                           "process"))  # fmt: skip
    state = "vllm.distributed.parallel_state"
    for name in ("get_tp_group", "get_pp_group"):
        if vllm.module(state) is not None and vllm.function(state, name) is None:
            out.append(Problem("warning", f"{state}.{name}", f"{state}.{name} is gone: a worker's status derives its "
                               "ranks from the configuration"))  # fmt: skip
    config = "vllm.config.parallel:ParallelConfig"
    if vllm.cls(config) is not None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if not _has_field(vllm, config, name):
                out.append(Problem("error", f"{config}.{name}", f"ParallelConfig has no {name}, which the status "
                                   "and control methods read to name each worker"))  # fmt: skip
        if not any(_has_field(vllm, config, name) for name in ("data_parallel_index", "data_parallel_rank")):
            out.append(Problem("warning", f"{config}.data_parallel_rank", "ParallelConfig has neither "
                               "data_parallel_index nor data_parallel_rank: status records carry no data-parallel "
                               "rank"))  # fmt: skip
    return out


def _has_field(vllm: _Reader, label: str, name: str) -> bool:
    cls = vllm.cls(label)
    return cls is not None and (vllm.tree.lookup(cls, name) is not None or vllm.sets_on_self(label, name))


_CHECKS: tuple[_Check, ...] = (
    _general_plugins,
    _endpoint_plugins,
    _engine_core,
    _workers,
    _engine_client,
    _envs,
    _ray,
    _fallbacks,
)
