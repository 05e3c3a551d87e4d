"""The built-in demo image: reproducible, loadable, and runnable as a squashfs base."""

from __future__ import annotations

import hashlib

import pytest

from micropod import proc
from micropod.image.demo import APPLETS, BUSYBOX, DEMO_REFERENCE, build_demo_image
from micropod.image.load import load_image
from micropod.image.store import ImageStore
from micropod.paths import StateRoot
from micropod.rootfs.squash import ensure_rootfs
from tests.imagetools import squash_tree

pytestmark = pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static not installed")

REQUIRED = ["sh", "echo", "cat", "ls", "sleep", "true", "false", "id", "env", "uname", "hostname", "ps", "mount",
            "touch", "rm", "mkdir", "nproc", "head", "tail", "wc", "printf", "test", "[", "kill", "date", "grep",
            "sed", "awk", "seq", "dd", "sync", "stat", "chmod", "pwd", "whoami", "tr", "nc"]


def test_same_bytes_every_build(tmp_path):
    a, b = build_demo_image(tmp_path / "a.tar"), build_demo_image(tmp_path / "b.tar")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_applets_exist_in_busybox():
    offered = set(proc.run([BUSYBOX, "--list"]).stdout.decode().split())
    assert set(REQUIRED) <= set(APPLETS) <= offered


def test_loads_and_builds_a_rootfs(tmp_path):
    root = StateRoot(tmp_path / "root").ensure()
    store = ImageStore(root.images)
    (img,) = load_image(store, build_demo_image(tmp_path / "demo.tar"))
    assert img.refs == (DEMO_REFERENCE,)
    assert store.resolve("hello") == img
    c = img.config
    assert c.cmd == ("/usr/bin/hello",) and c.working_dir == "/" and c.env[0].startswith("PATH=")
    assert (c.architecture, c.os) == ("amd64", "linux")
    assert img.layers[0].media_type.endswith("tar+gzip")

    tree = squash_tree(ensure_rootfs(root, store, img))
    hello = tree["usr/bin/hello"]
    assert hello.mode & 0o111 and hello.data.startswith(b"#!/bin/sh") and b"microVM" in hello.data
    assert tree["bin/busybox"].data == BUSYBOX.read_bytes()
    assert all(tree[f"bin/{a}"].link == "busybox" for a in REQUIRED)
    assert b"alice:x:1000:1000:" in tree["etc/passwd"].data and b"nobody" in tree["etc/passwd"].data
    assert b"alice:x:1000:" in tree["etc/group"].data
    assert tree["tmp"].mode == 0o1777
    assert (tree["home/alice"].uid, tree["home/alice"].gid) == (1000, 1000)
    assert "root" in tree


def test_hello_script_runs_under_busybox(tmp_path):
    from micropod.image.demo import HELLO_SCRIPT

    script = tmp_path / "hello"
    script.write_bytes(HELLO_SCRIPT)
    out = proc.run([BUSYBOX, "sh", script]).stdout.decode()
    assert out.startswith("Hello from micropod! This container is running inside a microVM (kernel ")
