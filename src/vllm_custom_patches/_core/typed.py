"""``TypedAs[Target]``: a patch's ``self`` typed as its target, for type checkers only.

Inside a patch's methods ``self`` is an instance of the target, but a type
checker sees the patch class: ``self.waiting`` is an unknown attribute.  Naming
``TypedAs[Target]`` as a second base, as in ::

    class FairShare(VLLMPatch[Scheduler], TypedAs[Scheduler]): ...

makes the type checker see the patch as a subclass of ``Target``: attributes
of the target type-check (a typo is an error), ``@override`` finds the member
it replaces and checks its signature, and an editor completes the target's
members.  At run time ``TypedAs[anything]`` is one empty class that
contributes nothing: :func:`~vllm_custom_patches._core.spec.build_spec` never
grafts from it, the target is still the one named in ``VLLMPatch[...]``, and
the argument (a class or any string) is not looked at, so naming a class that
is imported only for type checkers costs no import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["TypedAs"]

if TYPE_CHECKING:
    from typing import Annotated, TypeAlias, TypeVar

    _T = TypeVar("_T")

    # ``Annotated[T, ...]`` is ``T`` to a type checker, so the base is the
    # target itself; the note says where it came from in error messages.
    TypedAs: TypeAlias = Annotated[_T, "vllm_custom_patches.TypedAs"]
else:

    class TypedAs:
        """A patch's ``self`` typed as its target: ``class P(VLLMPatch[T], TypedAs[T])``.

        Type checkers see ``TypedAs[T]`` as ``T``; at run time it is this
        empty class, whatever ``T`` is, and nothing of it is grafted.
        """

        __slots__ = ()

        def __class_getitem__(cls, target: object) -> type[TypedAs]:
            return cls
