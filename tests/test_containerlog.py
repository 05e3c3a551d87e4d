import json
import re
from datetime import UTC, datetime
from pathlib import Path

from micropod.containerlog import PARTIAL_LIMIT, ContainerLog, LogReader, read_entries, rotated


def test_round_trip_keeps_non_utf8_bytes(tmp_path: Path) -> None:
    log = ContainerLog(tmp_path / "c.log")
    log.write("stdout", b"hello\n")
    log.write("stderr", b"\xff\xfe raw\n")
    log.close()
    entries, offset = read_entries(tmp_path / "c.log")
    assert [(e.stream, e.data) for e in entries] == [("stdout", b"hello\n"), ("stderr", b"\xff\xfe raw\n")]
    assert entries[0].time.endswith("Z")
    assert offset == (tmp_path / "c.log").stat().st_size


def test_torn_last_line_is_left_for_later(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(path)
    log.write("stdout", b"one\n")
    log.close()
    with path.open("ab") as f:
        f.write(b'{"log": "tw')
    entries, offset = read_entries(path)
    assert len(entries) == 1
    with path.open("ab") as f:
        f.write(b'o\\n", "stream": "stdout", "time": "t"}\n')
    more, _ = read_entries(path, offset)
    assert [e.data for e in more] == [b"two\n"]


def test_missing_log_is_empty(tmp_path: Path) -> None:
    assert read_entries(tmp_path / "none") == ([], 0)


def test_rotation_keeps_max_files_and_readers_see_everything_in_order(tmp_path: Path) -> None:
    from micropod.containerlog import LogReader

    path = tmp_path / "c.log"
    log = ContainerLog(path, max_size=200, max_files=3)
    reader = LogReader(path)
    assert reader.backlog() == []
    seen: list[bytes] = []
    for i in range(12):
        log.write("stdout", f"line {i}\n".encode())
        if i % 2:  # the reader polls less often than the log writes, across rotations
            seen += [e.data for e in reader.more()]
    log.close()
    assert seen == [f"line {i}\n".encode() for i in range(12)]
    assert (tmp_path / "c.log.1").exists() and (tmp_path / "c.log.2").exists()
    assert not (tmp_path / "c.log.3").exists()
    kept = [e.data for e in LogReader(path).backlog()]
    assert kept == [f"line {i}\n".encode() for i in range(12 - len(kept), 12)]
    assert 4 <= len(kept) < 12


def test_max_file_one_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(path, max_size=10, max_files=1)
    log.write("stdout", b"a long enough line\n")
    log.write("stdout", b"x\n")
    log.close()
    assert [e.data for e in read_entries(path)[0]] == [b"x\n"] or not path.exists()
    assert not (tmp_path / "c.log.1").exists()


def test_since_accepts_rfc3339_unix_and_relative() -> None:
    import pytest

    from micropod.containerlog import parse_since
    from micropod.errors import UsageError

    assert parse_since("2024-01-02T03:04:05Z") == 1704164645.0
    assert parse_since("2024-01-02T04:04:05+01:00") == 1704164645.0
    assert parse_since("1704164645") == 1704164645.0
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("1h30m", now=10000.0) == 4600.0
    with pytest.raises(UsageError):
        parse_since("yesterday")


def test_one_entry_per_line_and_partial_lines_wait(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(path)
    log.write("stdout", b"one\ntwo\nthr")
    log.write("stderr", b"err\n")
    assert [e.data for e in read_entries(path)[0]] == [b"one\n", b"two\n", b"err\n"]
    log.write("stdout", b"ee\nprompt$ ")
    log.close()
    assert [e.data for e in read_entries(path)[0]] == [b"one\n", b"two\n", b"err\n", b"three\n", b"prompt$ "]


def _entry(text: str, when: float) -> bytes:
    from datetime import datetime

    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps({"log": text, "stream": "stdout", "time": stamp}).encode() + b"\n"


def test_tail_and_since_read_only_the_end_of_a_huge_log(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "container.log"
    with path.open("wb") as f:
        f.write(_entry("first\n", 1000.0))
        f.truncate(1 << 30)  # 1 GiB of hole stands for a log a guest wrote for days
        f.seek(0, 2)
        f.write(b"\n" + b"".join(_entry(f"line {i}\n", 2000.0 + i) for i in range(10)) + b'{"torn')
    tracemalloc.start()
    try:
        reader = LogReader(path)
        tail = reader.recent(2, None)
        since = LogReader(path).recent(None, 2007.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.data for e in tail] == [b"line 8\n", b"line 9\n"]
    assert [e.data for e in since] == [b"line 7\n", b"line 8\n", b"line 9\n"]
    assert peak < 16 << 20, f"reading the end of the log took {peak >> 20} MiB"
    with path.open("ab") as f:  # following goes on after the last whole line
        f.write(b'"}\n' + _entry("line 10\n", 2010.0))
    assert [e.data for e in reader.more()] == [b"line 10\n"]


def test_tail_reaches_back_into_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "container.log"
    rotated(path, 1).write_bytes(b"".join(_entry(f"old {i}\n", 100.0 + i) for i in range(3)))
    path.write_bytes(_entry("new\n", 200.0))
    assert [e.data for e in LogReader(path).recent(3, None)] == [b"old 1\n", b"old 2\n", b"new\n"]
    assert [e.data for e in LogReader(path).recent(0, None)] == []


CRI_LINE = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)$")


def test_a_cri_log_has_kubelet_s_format_with_partial_lines_marked(tmp_path: Path) -> None:
    cri = tmp_path / "pods" / "c" / "0.log"
    cri.parent.mkdir(parents=True)
    log = ContainerLog(tmp_path / "container.log", cri_path=str(cri))
    log.write("stdout", b"one\ntwo")
    log.write("stderr", b"oops\n")
    log.write("stdout", b"x" * (PARTIAL_LIMIT + 10))  # with "two": past the limit, out as a partial entry
    log.close()  # what is left of a line at the end is a partial entry too
    lines = [CRI_LINE.match(line) for line in cri.read_bytes().splitlines()]
    assert all(lines), cri.read_bytes()[:300]
    parsed = [(m.group(2), m.group(3), m.group(4)) for m in lines if m]
    assert parsed[:2] == [(b"stdout", b"F", b"one"), (b"stderr", b"F", b"oops")]
    assert [p[1] for p in parsed[2:]] == [b"P"] * (len(parsed) - 2)
    assert b"".join(p[2] for p in parsed[2:]) == b"two" + b"x" * (PARTIAL_LIMIT + 10)
    stamp = lines[0].group(1).decode() if lines[0] else ""
    assert datetime.strptime(stamp[:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ")
    assert [e.data for e in read_entries(tmp_path / "container.log")[0]][:2] == [b"one\n", b"oops\n"]  # docker's too


def test_a_reopened_cri_log_starts_a_new_file_after_kubelet_renamed_it(tmp_path: Path) -> None:
    cri = tmp_path / "0.log"
    log = ContainerLog(tmp_path / "container.log", cri_path=str(cri))
    log.write("stdout", b"before\n")
    cri.rename(tmp_path / "0.log.20261205-180000")
    log.write("stdout", b"still the old file\n")  # until the reopen, as with containerd
    assert log.cri is not None
    log.cri.reopen()
    log.write("stdout", b"after\n")
    log.close()
    assert cri.read_bytes().endswith(b" stdout F after\n") and b"before" not in cri.read_bytes()
    assert b"still the old file" in (tmp_path / "0.log.20261205-180000").read_bytes()


def test_a_cri_log_never_follows_a_symlink_and_an_unwritable_one_is_not_fatal(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "0.log").symlink_to(target)
    log = ContainerLog(tmp_path / "container.log", cri_path=str(tmp_path / "0.log"))
    log.write("stdout", b"line\n")
    log.close()
    assert not target.exists()
    assert [e.data for e in read_entries(tmp_path / "container.log")[0]] == [b"line\n"]
