"""The CUDA memory gauges of a stage replica, on a CPU machine: torch.cuda's counters are
replaced by fakes, so what reaches each gauge is checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from deployments import metrics
from deployments.metrics import StageMetrics, gpu_memory_budget


class FakeGauge:
    def __init__(self, spec) -> None:
        self.name, self.values = spec.name, {}

    def set(self, value, tags) -> None:
        self.values[tags["stage"]] = value

    def observe(self, value, tags) -> None:
        pass

    inc = observe


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(metrics, "make", FakeGauge)
    counters = {"memory_allocated": 3, "memory_reserved": 5, "max_memory_reserved": 11}
    for name, value in counters.items():
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("Props", (), {"total_memory": 80})())


@pytest.mark.parametrize(("share", "budget"), [(None, None), (0.0, None), (0.1, 8), (0.4, 32), (1.0, 80), (2.0, 80)])
def test_the_budget_is_the_gpu_share_of_the_devices_memory(share, budget):
    assert gpu_memory_budget(share, 80) == budget


def test_a_cuda_replica_exports_its_peak_beside_its_budget_after_a_batch(fake_cuda):
    stage = StageMetrics("MovqDecoder", "cuda:0", gpu_share=0.1)
    stage.batch(4, 0.5, [0.01])
    assert stage.gpu_allocated.values == {"MovqDecoder": 3}
    assert stage.gpu_reserved.values == {"MovqDecoder": 5}
    assert stage.gpu_peak.values == {"MovqDecoder": 11}  # the allocator's peak, not the sample after the batch
    assert stage.gpu_budget.values == {"MovqDecoder": 8}  # over budget: 11 > 8


def test_without_a_share_no_budget_and_on_cpu_no_gpu_gauges(fake_cuda):
    shared = StageMetrics("Prior", "cuda:0")
    shared.refresh_gauges()
    assert shared.gpu_peak.values == {"Prior": 11} and shared.gpu_budget.values == {}
    cpu = StageMetrics("Prior", "cpu", gpu_share=0.5)
    cpu.batch(1, 0.1, [])
    assert cpu.gpu_peak.values == {} and cpu.gpu_budget.values == {}
