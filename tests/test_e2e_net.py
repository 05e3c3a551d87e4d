"""End to end networking: real microVMs under QEMU, with micropod running in a "host" network namespace
and an "outside" one playing the internet (tests/nettopo.py). The machine's own namespace is never used.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropod.net.addressing import mac_for, tap_name
from micropod.net.owner import Owner
from tests.conftest import Cli, require_guest
from tests.nettopo import HOST_IP, METADATA_IP, OUTSIDE_IP, Topology, topology
from tests.test_e2e_exec import start_sleeper
from tests.test_e2e_run import console_of, one_line_error, ps, wait_for

pytestmark = pytest.mark.e2e

FETCH = ("import sys, urllib.request\n"
         "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode(), end='')")
SERVE = ("import functools, http.server, sys\n"
         "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])\n"
         "server = http.server.HTTPServer((sys.argv[1], 8000), handler)\n"
         "print('listening', flush=True)\n"
         "server.serve_forever()\n")
BANNER = ("import socket, sys\n"
          "s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
          "print('listening', flush=True)\n"
          "while True:\n"
          "    c, _ = s.accept(); c.sendall(b'host-service\\n'); c.close()\n")
LISTEN = ("import socket, sys, time\n"
          "s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
          "print('listening', flush=True); time.sleep(600)\n")


@pytest.fixture
def world(tmp_path: Path, hello_archive: Path) -> Iterator[tuple[Topology, Cli]]:
    require_guest()
    with topology() as topo:
        cli = Cli(tmp_path / "root", netns=topo.host)
        loaded = cli("load", "-i", str(hello_archive))
        assert loaded.returncode == 0, loaded.stderr
        try:
            yield topo, cli
        finally:
            ids = cli("ps", "-aq", "--no-trunc").stdout.split()
            if ids:
                cli("rm", "-f", *ids, timeout=120)


def fetch(topo: Topology, netns: str, url: str) -> str | None:
    out = topo.run(netns, sys.executable, "-c", FETCH, url, timeout=30)
    return out.stdout if out.returncode == 0 else None


def started(process: object) -> None:
    """Wait (bounded) for a helper process to print its first line."""
    import select
    import subprocess

    assert isinstance(process, subprocess.Popen)
    ready, _, _ = select.select([process.stdout], [], [], 30)
    assert ready and process.stdout.readline().strip() == "listening", process.stderr.read() if process.stderr else ""


def inspect(cli: Cli, name: str) -> dict[str, object]:
    out = cli("inspect", name)
    assert out.returncode == 0, out.stderr
    info: dict[str, object] = json.loads(out.stdout)[0]
    return info


def guest(cli: Cli, name: str, script: str) -> tuple[int, str]:
    out = cli("exec", name, "sh", "-c", script)
    return out.returncode, out.stdout + out.stderr


def leftovers(topo: Topology, root: Path) -> dict[str, object]:
    links = json.loads(topo.run(topo.host, "ip", "-j", "link").stdout)
    tables = topo.run(topo.host, "nft", "list", "tables").stdout
    with sqlite3.connect(root / "state.db") as db:
        leases, attached = (_rows(db, f"SELECT vm_id FROM {table}") for table in ("leases", "attachments"))
    return {"taps": [link["ifname"] for link in links if link["ifname"].startswith("mp-")],
            "tables": tables.split(), "leases": leases, "attachments": attached}


def _rows(db: sqlite3.Connection, query: str) -> list[object]:
    try:
        return db.execute(query).fetchall()
    except sqlite3.OperationalError:  # the table was never made: nothing was ever leased or attached
        return []


NOTHING = {"taps": [], "tables": [], "leases": [], "attachments": []}


def http_get(host: str, port: int, path: str = "/") -> str:
    """A guest's shell line: one HTTP request with busybox nc, which gives up connecting after 3 s."""
    return f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}"


def test_nat_egress_published_ports_dns_and_visibility(world: tuple[Topology, Cli], tmp_path: Path) -> None:
    topo, cli = world
    site = tmp_path / "site"
    site.mkdir()
    (site / "greeting").write_text("hello from the outside\n")
    server = topo.spawn(topo.outside, sys.executable, "-c", SERVE, OUTSIDE_IP, str(site))
    metadata = topo.spawn(topo.outside, sys.executable, "-c", SERVE, METADATA_IP, str(site))
    host_service = topo.spawn(topo.host, sys.executable, "-c", BANNER, "9999")  # on every host address
    try:
        started(server)
        started(metadata)
        started(host_service)
        out = cli("run", "-d", "--name", "web", "-p", "8080:80", "--dns", "192.0.2.53", "hello", "sh", "-c",
                  "mkdir -p /www && echo served-by-the-guest > /www/index.html && echo ready && "
                  "exec httpd -f -p 80 -h /www")
        assert out.returncode == 0, out.stderr
        vm_id = out.stdout.strip()
        wait_for(lambda: "ready" in cli("logs", "web").stdout, 60, "the guest's server", lambda: console_of(cli, "web"))

        # egress: the outside has no route to the VM subnet, so an answer means NAT worked
        code, text = guest(cli, "web", http_get(OUTSIDE_IP, 8000, "/greeting"))
        assert code == 0 and "hello from the outside" in text, text
        # but not the cloud's metadata service, which the host itself reaches
        assert fetch(topo, topo.host, f"http://{METADATA_IP}:8000/greeting") == "hello from the outside\n"
        code, text = guest(cli, "web", http_get(METADATA_IP, 8000, "/greeting"))
        assert code != 0 and "hello" not in text, text
        # nor the host's own services: on the gateway, on the uplink's address
        greeting = topo.run(topo.outside, sys.executable, "-c", "import socket, sys; "
                            f"print(socket.create_connection(('{HOST_IP}', 9999), 3).recv(64).decode())")
        assert "host-service" in greeting.stdout, greeting.stderr  # the service is there for the outside
        for address in ("10.88.0.1", HOST_IP):
            code, text = guest(cli, "web", f"nc -w 3 {address} 9999 </dev/null")
            assert code != 0 and "host-service" not in text, (address, text)
        assert _drops(topo, cli, '"drop"', "inet", chain="input") >= 2
        server.terminate()
        _, log = server.communicate(timeout=10)
        assert f"{HOST_IP} - - " in log and "GET /greeting" in log, log  # seen from the host's address

        # published port, from the outside world and from the host itself through localhost
        url = f"http://{HOST_IP}:8080/"
        wait_for(lambda: fetch(topo, topo.outside, url) == "served-by-the-guest\n", 30, "the published port",
                 lambda: console_of(cli, "web"))
        assert fetch(topo, topo.host, "http://127.0.0.1:8080/") == "served-by-the-guest\n"
        assert fetch(topo, topo.host, url) == "served-by-the-guest\n"
        # the host opens connections to its guests: the answers come back in
        guest_ip = inspect(cli, "web")["NetworkSettings"]["IPAddress"]  # type: ignore[index]
        assert fetch(topo, topo.host, f"http://{guest_ip}:80/") == "served-by-the-guest\n"

        # what the user sees: port, ps, inspect, and the guest's own view agree
        assert cli("port", "web").stdout == "80/tcp -> 0.0.0.0:8080\n"
        assert cli("port", "web", "80").stdout == "0.0.0.0:8080\n"
        assert [r["Ports"] for r in ps(cli)] == ["0.0.0.0:8080->80/tcp"]
        settings = inspect(cli, "web")["NetworkSettings"]
        assert isinstance(settings, dict)
        assert ipaddress.IPv4Address(settings["IPAddress"]) in ipaddress.IPv4Network("10.88.0.0/16")
        assert settings["MacAddress"] == mac_for(vm_id) and settings["Gateway"] == "10.88.0.1"
        assert settings["Ports"] == {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}
        _, addr = guest(cli, "web", "ip addr show eth0")
        assert f"inet {settings['IPAddress']}/16" in addr and mac_for(vm_id) in addr, addr
        _, etc = guest(cli, "web", "cat /etc/resolv.conf /etc/hosts")
        assert "nameserver 192.0.2.53" in etc and f"{settings['IPAddress']}\t{vm_id[:12]}" in etc, etc
        _, lo = guest(cli, "web", "ping -c1 -W2 127.0.0.1")
        assert "1 packets received" in lo, lo
        [stats] = map(json.loads, cli("stats", "--no-stream", "--format", "json", "web").stdout.splitlines())
        received, sent = stats["NetIO"].split(" / ")
        assert received != "0B" and sent != "0B", stats
    finally:
        for helper in (server, metadata, host_service):
            helper.kill()
    assert cli("rm", "-f", "web").returncode == 0
    assert leftovers(topo, cli.root) == NOTHING


IP_SOURCE = '{"payload": {"protocol": "ip", "field": "saddr"}}'
ARP_SOURCE = '{"payload": {"protocol": "arp", "field": "saddr ip"}}'
MAC_SOURCE = '{"payload": {"protocol": "ether", "field": "saddr"}}'


def _drops(topo: Topology, cli: Cli, match: str, family: str = "netdev", chain: str | None = None) -> int:
    """The packets counted by the first rule of the root's ``family`` table that mentions ``match``."""
    listed = topo.run(topo.host, "nft", "-j", "list", "table", family, Owner.of(cli.root).table).stdout
    table = json.loads(listed or '{"nftables": []}')
    for item in table["nftables"]:
        rule = item.get("rule")
        if rule and match in json.dumps(rule["expr"]) and chain in (None, rule["chain"]):
            return int(next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e))
    raise AssertionError(f"no rule matching {match}: {table}")


def test_a_guest_that_changes_its_ip_or_mac_is_cut_off(world: tuple[Topology, Cli]) -> None:
    topo, cli = world
    # NET_ADMIN stands for a guest taken over (docker's default set lacks it): the host's rules must hold anyway.
    start_sleeper(cli, "sneaky", "--cap-add", "NET_ADMIN")
    code, text = guest(cli, "sneaky", f"ping -c1 -W3 {OUTSIDE_IP}")
    assert code == 0, text

    code, text = guest(cli, "sneaky",
                       f"ip addr add 10.88.0.250/16 dev eth0 && ping -c2 -W2 -I 10.88.0.250 {OUTSIDE_IP}")
    assert code != 0 and "0 packets received" in text, text
    assert _drops(topo, cli, IP_SOURCE) + _drops(topo, cli, ARP_SOURCE) > 0

    before = _drops(topo, cli, MAC_SOURCE)
    code, text = guest(cli, "sneaky", f"ip link set eth0 address 02:66:66:66:66:66 && ping -c2 -W2 {OUTSIDE_IP}")
    assert code != 0 and "0 packets received" in text, text
    assert _drops(topo, cli, MAC_SOURCE) > before
    # a well-behaved neighbour is unaffected
    start_sleeper(cli, "honest")
    code, text = guest(cli, "honest", f"ping -c1 -W3 {OUTSIDE_IP}")
    assert code == 0, text


def test_two_vms_get_distinct_addresses_and_rm_leaves_nothing(world: tuple[Topology, Cli], tmp_path: Path,
                                                              hello_archive: Path) -> None:
    topo, cli = world
    start_sleeper(cli, "one", "-p", "8081:80")
    start_sleeper(cli, "two", "-p", "8082:80/udp")
    one, two = (inspect(cli, n)["NetworkSettings"] for n in ("one", "two"))
    assert isinstance(one, dict) and isinstance(two, dict)
    assert one["IPAddress"] != two["IPAddress"] and one["MacAddress"] != two["MacAddress"]
    code, text = guest(cli, "one", f"ping -c1 -W3 {two['IPAddress']}")
    assert code == 0, text
    taps = leftovers(topo, cli.root)["taps"]
    assert sorted(taps) == sorted(tap_name(str(inspect(cli, n)["Id"])) for n in ("one", "two"))

    # a port already published: one clear line, nothing created
    clash = cli("run", "-d", "--name", "three", "-p", "8081:80", "hello", "true")
    assert clash.returncode == 125 and "port 8081/tcp is already published" in one_line_error(clash.stderr)
    assert sorted(r["Names"] for r in ps(cli)) == ["one", "two"]

    # another state root on this host: the busy default network is not its to share, and it touches nothing
    other = Cli(tmp_path / "other-root", netns=topo.host)
    assert other("load", "-i", str(hello_archive)).returncode == 0
    refused = other("run", "--rm", "hello", "true")
    assert refused.returncode == 125, refused.stderr
    assert (f"bridge micropod0 belongs to the state root {cli.root.resolve()}, which has VMs on it"
            in one_line_error(refused.stderr)), refused.stderr
    assert sorted(leftovers(topo, cli.root)["taps"]) == sorted(taps)

    # stop ends one VM's networking exactly; the other's stays
    assert cli("stop", "-t", "1", "one").returncode == 0
    ruleset = topo.run(topo.host, "nft", "list", "ruleset").stdout
    assert str(one["IPAddress"]) not in ruleset and str(two["IPAddress"]) in ruleset
    assert leftovers(topo, cli.root)["taps"] == [tap_name(str(inspect(cli, "two")["Id"]))]
    assert cli("port", "one").stdout == "" and cli("port", "two").stdout == "80/udp -> 0.0.0.0:8082\n"
    assert {r["Names"]: r["Ports"] for r in ps(cli)} == {"one": "", "two": "0.0.0.0:8082->80/udp"}
    assert cli("rm", "-f", "one").returncode == 0
    assert cli("rm", "-f", "two").returncode == 0
    assert leftovers(topo, cli.root) == NOTHING
    assert cli("rm", "-f", "two").returncode == 0  # idempotent


def test_a_crashed_run_is_reclaimed(world: tuple[Topology, Cli]) -> None:
    topo, cli = world
    start_sleeper(cli, "doomed", "-p", "8083:80")
    vm_id = str(inspect(cli, "doomed")["Id"])
    with sqlite3.connect(cli.root / "state.db") as db:
        monitor_pid, vmm_pid = db.execute("SELECT monitor_pid, vmm_pid FROM vms WHERE id = ?", (vm_id,)).fetchone()
    os.kill(monitor_pid, signal.SIGKILL)
    os.kill(vmm_pid, signal.SIGKILL)
    assert tap_name(vm_id) in leftovers(topo, cli.root)["taps"]
    wait_for(lambda: [r["State"] for r in ps(cli)] == ["dead"], 30, "reconciliation to see the crash")
    state = leftovers(topo, cli.root)
    assert state["taps"] == [] and state["tables"] == [] and state["attachments"] == []
    assert len(state["leases"]) == 1  # the address stays the container's until rm, as docker does
    assert cli("system", "prune", "-f").returncode == 0
    assert leftovers(topo, cli.root) == NOTHING


def test_bad_network_input_is_one_line_and_creates_nothing(world: tuple[Topology, Cli],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    topo, cli = world
    listener = topo.spawn(topo.host, sys.executable, "-c", LISTEN, "9090")
    try:
        started(listener)
        busy = cli("run", "--rm", "-p", "9090:80", "hello", "true")
        assert busy.returncode == 125
        assert "port 9090/tcp is already in use on the host" in one_line_error(busy.stderr)
    finally:
        listener.kill()
    for env, value, needle in [
        ("MICROPOD_SUBNET", f"{HOST_IP.rsplit('.', 1)[0]}.0/24", "collides with 192.0.2.1/24 on uplink0"),
        ("MICROPOD_BRIDGE", "uplink0", "uplink0 exists and is not a bridge"),
        ("MICROPOD_SUBNET", "10.88.0.0/33", "invalid subnet"),
    ]:
        monkeypatch.setenv(env, value)
        out = cli("run", "--rm", "hello", "true")
        assert out.returncode == 125 and needle in one_line_error(out.stderr), out.stderr
        monkeypatch.delenv(env)
    assert ps(cli) == [] and leftovers(topo, cli.root) == NOTHING

    # a /30 holds the gateway and one VM: the second is refused, and the first is unharmed
    monkeypatch.setenv("MICROPOD_SUBNET", "10.99.0.0/30")
    monkeypatch.setenv("MICROPOD_BRIDGE", "mptiny0")
    start_sleeper(cli, "only")
    full = cli("run", "--rm", "hello", "true")
    assert full.returncode == 125 and "no free address left in 10.99.0.0/30" in one_line_error(full.stderr)
    assert [r["Names"] for r in ps(cli)] == ["only"]
    assert cli("rm", "-f", "only").returncode == 0
    assert leftovers(topo, cli.root) == NOTHING


def test_an_exited_container_keeps_its_address_and_starts_again(world: tuple[Topology, Cli]) -> None:
    topo, cli = world
    out = cli("run", "--name", "again", "hello", "sh", "-c", "ip -4 addr show eth0 | grep -o 'inet [0-9.]*'")
    assert out.returncode == 0, out.stderr
    state = leftovers(topo, cli.root)
    assert state["taps"] == [] and state["attachments"] == [] and len(state["leases"]) == 1
    second = cli("start", "-a", "again")
    assert (second.returncode, second.stdout) == (0, out.stdout), second.stderr
    assert cli("rm", "again").returncode == 0
    assert leftovers(topo, cli.root) == NOTHING


def test_concurrent_runs_get_distinct_addresses(world: tuple[Topology, Cli]) -> None:
    topo, cli = world
    runs = [cli.spawn("run", "--rm", "hello", "sh", "-c", "ip -4 addr show eth0 | grep -o 'inet [0-9.]*'")
            for _ in range(4)]
    results = [run.communicate(timeout=240) for run in runs]
    assert all(run.returncode == 0 for run in runs), results
    addresses = [out.strip() for out, _ in results]
    assert len(set(addresses)) == 4 and all(a.startswith("inet 10.88.0.") for a in addresses), addresses
    assert leftovers(topo, cli.root) == NOTHING


def test_network_none_has_no_nic_and_touches_nothing(world: tuple[Topology, Cli]) -> None:
    topo, cli = world
    out = cli("run", "--rm", "--network", "none", "hello", "ls", "/sys/class/net")
    assert (out.returncode, out.stdout.split()) == (0, ["lo"]), out.stderr
    links = json.loads(topo.run(topo.host, "ip", "-j", "link").stdout)
    assert [link["ifname"] for link in links] == ["lo", "uplink0"]
    assert leftovers(topo, cli.root) == NOTHING


def test_dns_over_udp_through_nat(world: tuple[Topology, Cli]) -> None:
    topo, cli = world
    server = topo.spawn(topo.outside, sys.executable, str(Path(__file__).parent / "fake_dns.py"), OUTSIDE_IP)
    try:
        started(server)
        out = cli("run", "--rm", "--dns", OUTSIDE_IP, "hello", "nslookup", "example.test")
        assert out.returncode == 0 and "Address: 192.0.2.99" in out.stdout, out.stdout + out.stderr
    finally:
        server.kill()
        log, _ = server.communicate(timeout=10)
    assert f"query from {HOST_IP}" in log, log  # the guest's query left through the host's address


def test_vms_reach_each_other_and_themselves_through_published_ports(world: tuple[Topology, Cli],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    topo, cli = world
    # As on hosts without br_netfilter: bridged replies then bypass the host's conntrack, which only
    # the hairpin masquerade makes work. The setting is per namespace; this one is the test's own.
    topo.run(topo.host, "sh", "-c", "f=/proc/sys/net/bridge/bridge-nf-call-iptables; [ ! -e $f ] || echo 0 > $f")
    out = cli("run", "-d", "--name", "server", "-p", "8090:80", "hello", "sh", "-c",
              "mkdir -p /www && echo hairpin-ok > /www/index.html && echo ready && exec httpd -f -p 80 -h /www")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "ready" in cli("logs", "server").stdout, 60, "the server", lambda: console_of(cli, "server"))
    start_sleeper(cli, "client")
    for name in ("client", "server"):
        code, text = guest(cli, name, http_get("10.88.0.1", 8090))
        assert code == 0 and "hairpin-ok" in text, (name, text)
    server_ip = inspect(cli, "server")["NetworkSettings"]["IPAddress"]  # type: ignore[index]
    code, text = guest(cli, "client", http_get(server_ip, 80))
    assert code == 0 and "hairpin-ok" in text, text  # VM to VM, directly: docker's default bridge allows it

    # a VM started with MICROPOD_ICC=0 reaches no other VM, nor is reached, but through published ports
    monkeypatch.setenv("MICROPOD_ICC", "0")
    start_sleeper(cli, "loner")
    monkeypatch.delenv("MICROPOD_ICC")
    loner_ip = inspect(cli, "loner")["NetworkSettings"]["IPAddress"]  # type: ignore[index]
    code, text = guest(cli, "loner", http_get(server_ip, 80))
    assert code != 0 and "hairpin-ok" not in text, text
    code, text = guest(cli, "client", f"ping -c1 -W3 {loner_ip}")
    assert code != 0 and "0 packets received" in text, text
    # not even routed through the gateway, which would pass a bridge-only rule
    code, text = guest(cli, "loner", f"ip route add {server_ip}/32 via 10.88.0.1 && {http_get(server_ip, 80)}")
    assert code != 0 and "hairpin-ok" not in text, text
    code, text = guest(cli, "loner", http_get("10.88.0.1", 8090))
    assert code == 0 and "hairpin-ok" in text, text
    code, text = guest(cli, "loner", f"ping -c1 -W3 {OUTSIDE_IP}")
    assert code == 0, text
