"""The guest's resolv.conf and hosts, with docker's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from micropod.errors import UsageError
from micropod.net.dns import check_nameserver, hosts_file, resolv_conf


def host_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return path


def test_host_resolvers_are_copied_without_loopback_ones(tmp_path: Path) -> None:
    path = host_file(tmp_path, "# generated\nnameserver 127.0.0.53\nnameserver 10.1.2.3\nsearch corp.example\n"
                               "options edns0 trust-ad\nnameserver ::1\n")
    assert resolv_conf((), path) == "nameserver 10.1.2.3\nsearch corp.example\noptions edns0 trust-ad\n"


def test_only_loopback_resolvers_fall_back_to_public_ones(tmp_path: Path) -> None:
    path = host_file(tmp_path, "nameserver 127.0.0.53\n")
    assert resolv_conf((), path) == "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
    assert resolv_conf((), tmp_path / "missing") == "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"


def test_dns_flag_replaces_servers_and_keeps_search(tmp_path: Path) -> None:
    path = host_file(tmp_path, "nameserver 10.1.2.3\nsearch corp.example\n")
    assert resolv_conf(("1.1.1.1", "9.9.9.9"), path) == "nameserver 1.1.1.1\nnameserver 9.9.9.9\nsearch corp.example\n"


def test_nameserver_validation() -> None:
    assert check_nameserver("2001:db8::1") == "2001:db8::1"
    with pytest.raises(UsageError, match=r"invalid --dns 'dns\.google'"):
        check_nameserver("dns.google")


def test_hosts_names_the_container_at_its_address() -> None:
    assert hosts_file("web", "10.88.0.5").endswith("10.88.0.5\tweb\n")
    assert hosts_file("web", None).endswith("127.0.1.1\tweb\n")
    assert "web" not in hosts_file("", "10.88.0.5")
