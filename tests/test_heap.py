"""core.heap: the worker's collector settings after start-up."""

from __future__ import annotations

import gc

import pytest

from core import heap


@pytest.fixture
def restored_gc():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_settle_freezes_the_start_up_heap_and_raises_the_young_threshold(restored_gc, monkeypatch):
    monkeypatch.delenv("GATEWAY_GC_GEN0", raising=False)
    gc.unfreeze()
    heap.settle()
    assert gc.get_threshold() == (heap.DEFAULT_GEN0, 20, 20)
    assert gc.get_freeze_count() > 1000  # this process's modules, at least
    # cycles made after start-up are still collected
    cycle: list = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


@pytest.mark.parametrize("value", ["0", "-5"])
def test_settle_can_be_turned_off(restored_gc, monkeypatch, value):
    monkeypatch.setenv("GATEWAY_GC_GEN0", value)
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    heap.settle()
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def test_an_unreadable_setting_falls_back_to_the_default(restored_gc, monkeypatch):
    monkeypatch.setenv("GATEWAY_GC_GEN0", "lots")
    heap.settle()
    assert gc.get_threshold()[0] == heap.DEFAULT_GEN0
