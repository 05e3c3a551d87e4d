from pathlib import Path

from micropod.unixsock import MAX_SUN_PATH, SocketDir


def test_sockets_in_a_directory_deeper_than_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / "x.sock")) > MAX_SUN_PATH
    sockets = SocketDir(deep)
    listener = sockets.listen("x.sock")
    client = sockets.connect("x.sock", timeout=5)
    conn, _ = listener.accept()
    client.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    assert (deep / "x.sock").is_socket()
    for s in (client, conn, listener):
        s.close()
    sockets.close()


def test_short_paths_are_used_as_they_are(tmp_path: Path) -> None:
    sockets = SocketDir(Path("/tmp"))
    assert sockets.address("a.sock") == "/tmp/a.sock"
