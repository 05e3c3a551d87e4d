from pathlib import Path

from micropod.containerlog import ContainerLog, read_entries


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
