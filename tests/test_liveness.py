import os
import subprocess

from micropod.liveness import ProcessRef, start_time


def test_start_time_of_self_and_of_missing_pid() -> None:
    assert start_time(os.getpid()) is not None
    assert start_time(2**22 + 12345) is None


def test_dead_and_reaped_processes_are_not_alive() -> None:
    child = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(child.pid)
    assert ref is not None and ref.alive()
    ref.kill()
    child.wait(10)
    assert not ref.alive()


def test_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    ref = ProcessRef.of(child.pid)
    assert ref is not None
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert not ref.alive()
    child.wait()
