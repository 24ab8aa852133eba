"""A patch's live check: the objects its target already has in this process, and the patch's verdict on them.

A patch applied while the process runs (``PatchManager.apply``, the kill
switch) reaches objects that were built before it, without it: their
``__init__`` ran unpatched.  A patch that relies on their state (the catalogue
policies need vLLM's FCFS waiting queue) declares ``check_live`` (see
``VLLMPatch.check_live``); the ledger calls it on each instance found here,
before anything is changed, and a refusal refuses the apply.

Finding the instances: every instance of a Python class refers to its class,
and the garbage collector sees that reference, so ``gc.get_referrers`` of the
target and its subclasses lists them.  It walks the whole heap (about 0.1 s for
half a million objects), so it runs only for patches that declare a check and
never in the post-import hook (the target's module was imported a moment ago:
nothing has been built from it).  vLLM freezes its heap after start-up
(``gc.freeze()``), and frozen objects are invisible to ``gc``: the walk
unfreezes for its duration and freezes again after it.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from .errors import PatchApplyError, PatchError
from .graft import descendants

if TYPE_CHECKING:
    from .spec import PatchLike, PatchSpec

__all__ = ["check_live_instances", "live_instances"]


def live_instances(target: type) -> list[object]:
    """Every object in this process whose class is ``target`` or one of its subclasses.

    Found through the garbage collector, frozen objects included.  Objects
    that are unreachable but not collected yet are found too; instances of a
    class whose instances the collector does not track (none in pure Python)
    are not.
    """
    classes = descendants(target)
    wanted = set(classes)
    # A collection in the middle would walk the unfrozen heap for nothing.
    enabled = gc.isenabled()
    gc.disable()
    frozen = gc.get_freeze_count() > 0
    try:
        if frozen:
            gc.unfreeze()
        try:
            referrers = gc.get_referrers(*classes)
        finally:
            if frozen:
                # Freezes the objects made since the last freeze as well: no
                # API moves only the old ones back.  They stay alive as long as
                # anything refers to them, and vLLM unfreezes at shutdown.
                gc.freeze()
    finally:
        if enabled:
            gc.enable()
    return [obj for obj in referrers if type(obj) in wanted]


def check_live_instances(patch_cls: type[PatchLike], spec: PatchSpec, target: type) -> None:
    """Call the patch's ``check_live`` on each live instance of ``target``; raise what refuses the apply.

    A :class:`PatchError` the check raises is passed on as it is (its message
    is the patch's own); anything else is a fault of the check and becomes a
    :class:`PatchApplyError`.  A refusal is confirmed after a garbage
    collection: an instance that is only waiting to be collected (an engine
    torn down in the same process) is not live, and must not refuse an
    apply.  So the check may see an instance twice.
    """
    if not patch_cls._vcp_checks_live:
        return
    try:
        _check_each(patch_cls, spec, live_instances(target))
        return
    except PatchError:
        pass  # the error's traceback holds every instance found: let it go before collecting
    gc.collect()
    _check_each(patch_cls, spec, live_instances(target))


def _check_each(patch_cls: type[PatchLike], spec: PatchSpec, instances: list[object]) -> None:
    for instance in instances:
        try:
            patch_cls.check_live(instance)
        except PatchError:
            raise
        except Exception as exc:
            raise PatchApplyError(
                f"patch {spec.name!r}: its check_live failed on the live {type(instance).__qualname__} "
                f"at {id(instance):#x}: {type(exc).__name__}: {exc}. Nothing was applied."
            ) from exc
