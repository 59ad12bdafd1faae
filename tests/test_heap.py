"""Freed memory kept for reuse while influencekit computes (influencekit.heap)."""

from __future__ import annotations

import resource

import pytest
import torch

import influencekit as ik
from influencekit import heap

BLOCK = 64 * 2**20  # above glibc's mmap threshold outside retained()
PAGES = BLOCK // 4096


def _faults_of_fresh_blocks(cycles: int = 4, warm_up: int = 4) -> int:
    """Minor page faults of allocating, writing and freeing one BLOCK ``cycles`` times, after
    ``warm_up`` such cycles (the heap's layout settles within the first few: glibc's aligned
    allocation may not fit the exact hole the last block left)."""
    for _ in range(warm_up):
        del_me = torch.ones(BLOCK // 4)
        del del_me
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        block = torch.ones(BLOCK // 4)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not heap.available(), reason="glibc's allocator only")
def test_freed_blocks_are_reused_inside_and_given_back_after():
    with heap.retained():
        start = _resident_bytes()
        faults = _faults_of_fresh_blocks()
        kept = _resident_bytes() - start
    given_back = _resident_bytes() - start
    assert faults < PAGES // 10, faults  # the freed blocks' pages came back without faults
    assert kept >= BLOCK, kept  # ... because they stayed resident while retained
    assert given_back < BLOCK // 4, given_back  # and the outermost exit handed them back


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> _FakeLibc:
    fake = _FakeLibc()
    monkeypatch.setattr(heap, "_libc", fake)
    for name in (heap.SWITCH, "GLIBC_TUNABLES", *heap._USER_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    return fake


def test_only_the_outermost_block_sets_restores_and_trims(fake_libc):
    with heap.retained():
        with heap.retained():
            pass
        assert fake_libc.calls == [("mallopt", -1, heap.TRIM_THRESHOLD),
                                   ("mallopt", -3, heap.MMAP_THRESHOLD)]
    assert fake_libc.calls[2:] == [("mallopt", -1, heap.TRIM_THRESHOLD_AFTER),
                                   ("mallopt", -3, heap.MMAP_THRESHOLD_AFTER),
                                   ("malloc_trim", 0)]


def test_an_error_inside_still_restores(fake_libc):
    with pytest.raises(KeyError), heap.retained():
        raise KeyError("the computation failed")
    assert fake_libc.calls[-1] == ("malloc_trim", 0)
    assert heap._depth == 0


@pytest.mark.parametrize("name, value", [(heap.SWITCH, "0"), ("MALLOC_TRIM_THRESHOLD_", "1"),
                                         ("MALLOC_MMAP_THRESHOLD_", "1"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_switched_off_or_user_tuned_allocators_are_left_alone(fake_libc, monkeypatch, name,
                                                             value):
    monkeypatch.setenv(name, value)
    with heap.retained():
        pass
    assert fake_libc.calls == []


def test_influence_computations_run_retained(fake_libc):
    torch.manual_seed(0)
    X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    model = torch.nn.Linear(3, 2)
    inf = ik.Influence(model, ik.CrossEntropyObjective(), (X, y), solver="cg", damping=0.1,
                       stationarity_tol=None)
    inf.fit()
    assert fake_libc.calls[:2] == [("mallopt", -1, heap.TRIM_THRESHOLD),
                                   ("mallopt", -3, heap.MMAP_THRESHOLD)]
    fake_libc.calls.clear()
    inf.influence((X[:2], y[:2]))
    trims = [call for call in fake_libc.calls if call[0] == "malloc_trim"]
    assert len(trims) == 1  # the solve and products inside it did not trim on their own


def test_scores_do_not_depend_on_it(monkeypatch):
    torch.manual_seed(1)
    X, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def scores() -> torch.Tensor:
        inf = ik.Influence(model, ik.CrossEntropyObjective(), (X, y), solver="cg", damping=0.1,
                           curvature="gauss-newton", stationarity_tol=None)
        return inf.fit().influence((X[:5], y[:5]))

    retained = scores()
    monkeypatch.setenv(heap.SWITCH, "0")
    assert torch.equal(retained, scores())


def test_warnings_point_at_the_callers_line():
    """The package's frames (the retaining wrappers among them) are skipped: a warning names
    the user's line that led to it."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    inf = ik.Influence(torch.nn.Linear(3, 2), ik.CrossEntropyObjective(), (X, y), solver="cg",
                       damping=0.1)
    with pytest.warns(ik.errors.StationarityWarning) as caught:
        inf.fit()
    assert caught[0].filename == __file__
