"""Rule 8: idempotent, and consistent under apply/rollback from many threads."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from vllm_custom_patches import PatchConflictError, PatchManager, VLLMPatch
from vllm_custom_patches.testing import snapshot_namespace


def run_threads(worker: Callable[[int], None], count: int, timeout: float = 60) -> None:
    """Run ``worker(i)`` on ``count`` threads released together; fail on a deadlock."""
    barrier = threading.Barrier(count)

    def released(index: int) -> None:
        barrier.wait()
        worker(index)

    threads = [threading.Thread(target=released, args=(index,)) for index in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "deadlock"


class Shared:
    def a(self) -> str:
        return "a"

    def b(self) -> str:
        return "b"


def test_apply_is_idempotent() -> None:
    class Once(VLLMPatch[Shared]):
        def a(self) -> str:
            return "A"

    assert Once.apply() is True
    patched = snapshot_namespace(Shared)
    assert Once.apply() is False
    patched.assert_unchanged()
    assert PatchManager.applied().count("Once") == 1


def test_many_threads_apply_the_same_patch_exactly_once() -> None:
    class Contended(VLLMPatch[Shared]):
        def a(self) -> str:
            return "A"

    results: list[bool] = []
    run_threads(lambda _: results.append(Contended.apply()), 16)
    assert results.count(True) == 1 and results.count(False) == 15


def test_threads_applying_and_rolling_back_overlapping_patches_stay_consistent() -> None:
    before = snapshot_namespace(Shared)

    class OnA(VLLMPatch[Shared]):
        def a(self) -> str:
            return "A"

    class OnB(VLLMPatch[Shared]):
        def b(self) -> str:
            return "B"

    class AlsoOnA(VLLMPatch[Shared]):
        def a(self) -> str:
            return "A2"

    patches = [OnA, OnB, AlsoOnA]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            patch = rng.choice(patches)
            try:
                if rng.random() < 0.5:
                    patch.apply()
                else:
                    patch.rollback()
            except PatchConflictError:
                pass  # OnA and AlsoOnA exclude each other: expected
            except BaseException as exc:  # anything else is a bug
                errors.append(exc)

    run_threads(worker, 8)
    assert errors == []
    applied = set(PatchManager.applied())
    assert not {"OnA", "AlsoOnA"} <= applied
    expected_a = "A" if "OnA" in applied else "A2" if "AlsoOnA" in applied else "a"
    assert Shared().a() == expected_a
    assert Shared().b() == ("B" if "OnB" in applied else "b")
    PatchManager.rollback_all()
    before.assert_unchanged()


class Second:
    def x(self) -> int:
        return 0

    def y(self) -> int:
        return 0


def test_overlapping_patch_sets_over_two_targets_with_rollback_all_agree_with_the_registry() -> None:
    before = {cls: snapshot_namespace(cls) for cls in (Shared, Second)}
    patches = [
        type(f"Overlap{i}", (VLLMPatch[target],), {name: (lambda self, i=i: i) for name in names})
        for i, (target, names) in enumerate(
            [
                (Shared, ["a"]),
                (Shared, ["a", "b"]),
                (Shared, ["b"]),
                (Second, ["x"]),
                (Second, ["x", "y"]),
                (Second, ["y"]),
            ]
        )
    ]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            roll = rng.random()
            try:
                if roll < 0.05:
                    PatchManager.rollback_all()
                elif roll < 0.55:
                    rng.choice(patches).apply()
                else:
                    rng.choice(patches).rollback()
            except PatchConflictError:
                pass
            except BaseException as exc:
                errors.append(exc)

    run_threads(worker, 6)
    assert errors == []
    # The registry and the classes agree: every applied patch's members are there, and nothing else.
    owners = {}
    for name in PatchManager.applied():
        patch = PatchManager.get(name)
        for member in patch._vcp_spec.members:
            target = patch._vcp_spec.target
            assert (target, member) not in owners, "two applied patches own one member"
            owners[(target, member)] = name
            assert getattr(target(), member)() == int(name.removeprefix("Overlap"))
    for target, names in ((Shared, "ab"), (Second, "xy")):
        for member in names:
            if (target, member) not in owners:
                assert member not in vars(target) or vars(target)[member] is before[target].entries[member]
                assert f"_original_{member}" not in vars(target)
    PatchManager.rollback_all()
    for snapshot in before.values():
        snapshot.assert_unchanged()
