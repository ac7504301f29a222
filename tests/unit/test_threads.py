"""The thread policy: never more threads than free cores, never fewer than one per process."""
import pytest

from areal_py.threads import available_cores, busy_cores, choose_threads, role_threads


@pytest.mark.parametrize("cores,busy,processes,expected", [
    (2, 0.0, 1, 2),     # quiet 2-core box: both cores
    (2, 0.4, 1, 2),     # a little background noise rounds away
    (2, 0.6, 1, 1),     # most of a core taken: one thread
    (2, 2.0, 1, 1),     # a CPU burner per core: one thread, not two spinning against them
    (2, 8.0, 1, 1),     # load far above the cores: still at least one
    (2, 0.0, 3, 1),     # three processes on two cores: one each, never zero
    (16, 0.0, 3, 5),    # even share, rounded down
    (16, 4.2, 3, 4),    # 12 free cores over 3 processes
    (16, 15.0, 1, 1),
    (8, -1.0, 1, 8),    # a nonsense negative reading does not add cores
])
def test_choose_threads(cores, busy, processes, expected):
    assert choose_threads(cores, busy, processes) == expected


def test_choose_threads_never_exceeds_the_cores_nor_goes_under_one():
    for cores in range(1, 33):
        for busy in (0.0, 0.5, 1.0, cores / 2, cores, 3 * cores):
            for processes in range(1, 6):
                n = choose_threads(cores, busy, processes)
                assert 1 <= n and (n * processes <= cores or n == 1)


def test_choose_threads_rejects_nonsense():
    with pytest.raises(ValueError):
        choose_threads(0, 0.0)
    with pytest.raises(ValueError):
        choose_threads(4, 0.0, processes=0)


def test_role_threads():
    # async: trainer and servers share the free cores; the controller always gets one
    assert role_threads("trainer", "async", 1, cores=8, busy=0.0) == 4
    assert role_threads("rollout", "async", 3, cores=8, busy=0.0) == 2
    assert role_threads("controller", "async", 1, cores=8, busy=0.0) == 1
    # sync: the roles take turns, so each may use every free core
    assert role_threads("trainer", "sync", 2, cores=8, busy=0.0) == 8
    assert role_threads("trainer", "sync", 2, cores=8, busy=6.0) == 2
    # a loaded 2-core box in sync mode: one thread, not the two it used to get
    assert role_threads("trainer", "sync", 1, cores=2, busy=2.0) == 1
    # run.torch_threads set: taken as given, for every role
    assert role_threads("controller", "async", 1, cores=2, busy=9.0, configured=3) == 3


def test_machine_readings_are_sane():
    cores = available_cores()
    assert cores >= 1
    assert busy_cores(sample_s=0.05) >= 0.0


def test_busy_cores_reads_the_present_not_the_lagging_load_average(monkeypatch):
    """Right after a run ends the 1-minute load average still reads ~2 on an idle machine; the next
    run must see the idle cores (it got one thread where two were free)."""
    import areal_py.threads as T

    monkeypatch.setattr(T.os, "getloadavg", lambda: (2.0, 1.5, 1.0))
    stats = iter([(1000, 5000), (1010, 5200)])  # (busy, total) jiffies: 10 of 200 busy
    monkeypatch.setattr(T, "_proc_stat", lambda: next(stats))
    monkeypatch.setattr(T.os, "cpu_count", lambda: 2)
    assert busy_cores(sample_s=0) == pytest.approx(0.1)
