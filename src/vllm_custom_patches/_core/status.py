"""How a patch stands in this process, as :meth:`PatchManager.status` reports it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["PatchState", "PatchStatus"]


class PatchState(str, enum.Enum):
    """Where a known patch stands in this process."""

    APPLIED = "applied"
    AVAILABLE = "available"
    """Known and not applied; nothing has been tried or it was rolled back."""
    PENDING = "pending"
    """Selected; waits for its target's module to be imported."""
    SKIPPED = "skipped"
    """Not applied on purpose (version gate, or skipped by the selection policy)."""
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PatchStatus:
    """One patch as :meth:`PatchManager.status` reports it."""

    name: str
    target: str
    """The target as ``module:Qual.Name``."""
    state: PatchState
    reason: str = ""
    """Why it is skipped, failed or pending; empty otherwise."""
    overrides: tuple[str, ...] = ()
    """Members that replace one of the target's (known once the target is imported)."""
    additions: tuple[str, ...] = ()
    """Members the target did not have."""
    versions: str = ""
    """The vLLM version gate, as a PEP 440 specifier set; empty if none."""
    description: str = ""
    stackable: bool = False
    order: int = 0
    """Its place in a stack (higher is outer); meaningful only when ``stackable``."""
    exclusive: tuple[str, ...] = ()
    """Tokens that no other applied patch may declare too."""
    stacks: tuple[str, ...] = ()
    """While applied, each stack it is a layer of, as a chain outermost first:
    ``"Scheduler.schedule: admission_log (order 10) → shortest_prompt_first → vLLM"``."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "state": self.state.value,
            "reason": self.reason,
            "overrides": list(self.overrides),
            "additions": list(self.additions),
            "versions": self.versions,
            "description": self.description,
            "stackable": self.stackable,
            "order": self.order,
            "exclusive": list(self.exclusive),
            "stacks": list(self.stacks),
        }
