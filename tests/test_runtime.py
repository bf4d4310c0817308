"""CPU settings (spinedet.engine.runtime): threads and data loading processes."""

import os

import pytest
import torch

from spinedet.engine import runtime


@pytest.mark.parametrize(
    "cpu_max,expected",
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_cpu_budget_caps_affinity_by_cgroup_quota(tmp_path, monkeypatch, cpu_max, expected):
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    monkeypatch.setattr(runtime, "_CGROUP_CPU_MAX", path)
    assert runtime.cpu_budget() == min(affinity, expected or affinity)
    monkeypatch.setattr(runtime, "_CGROUP_CPU_MAX", tmp_path / "missing")
    assert runtime.cpu_budget() == affinity


def test_configure_cpu_threads_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "cpu_budget", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert runtime.configure_cpu_threads() == 1
        assert torch.get_num_threads() == 1
        assert runtime.configure_cpu_threads(2) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_configure_cpu_threads_leaves_an_explicit_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "cpu_budget", lambda: before + 1)
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    assert runtime.configure_cpu_threads() == before
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "device,cores,local_processes,expected",
    [
        ("cpu", 2, None, 0),  # the step's threads need both cores
        ("cpu", 4, None, 0),
        ("cpu", 16, None, 2),
        ("cpu", 16, "4", 0),  # 4 cores for each of 4 processes
        ("cuda", 16, None, 8),  # capped
        ("cuda", 6, None, 5),  # one core for the trainer
        ("cuda", 16, "8", 1),
        ("cuda", 4, "8", 1),  # at least one
    ],
)
def test_loader_workers_default_fits_device_and_cores(
    monkeypatch, device, cores, local_processes, expected
):
    monkeypatch.setattr(runtime, "cpu_budget", lambda: cores)
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert runtime.loader_workers(None, torch.device(device)) == expected
    assert runtime.loader_workers(3, torch.device(device)) == 3  # a given number stands
