import signal
from pathlib import Path

import pytest

from micropod.errors import UsageError
from micropod.runconfig import (
    ContainerSpec,
    RunConfig,
    merge_command,
    merge_env,
    parse_env_file,
    parse_signal,
)


def test_docker_command_rules() -> None:
    assert merge_command(("/ep",), ("a", "b"), None, ()) == ("/ep", "a", "b")
    assert merge_command(("/ep",), ("a",), None, ("x",)) == ("/ep", "x")
    # --entrypoint drops the image's Cmd
    assert merge_command(("/ep",), ("a",), "/other", ()) == ("/other",)
    assert merge_command((), ("sh",), "", ("echo", "hi")) == ("echo", "hi")
    with pytest.raises(UsageError, match="no command"):
        merge_command((), (), None, ())


def test_env_merging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "yes")
    monkeypatch.delenv("NOT_SET", raising=False)
    env = merge_env(("PATH=/bin", "A=1"), ["A=2", "B=x=y", "FROM_HOST", "NOT_SET"], "h1")
    assert env == ("PATH=/bin", "A=2", "B=x=y", "FROM_HOST=yes", "HOSTNAME=h1")
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in merge_env((), [], "h")
    with pytest.raises(UsageError):
        merge_env((), ["=x"], "h")


def test_env_file(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# comment\nA=1\n\n  B=2  \n")
    assert parse_env_file(f) == ["A=1", "B=2"]
    with pytest.raises(UsageError, match="--env-file"):
        parse_env_file(tmp_path / "missing")


def test_signals() -> None:
    assert parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal("kill") == signal.SIGKILL
    assert parse_signal("2") == 2
    assert parse_signal(None) == signal.SIGTERM
    for bad in ("SIGNOPE", "0", "999"):
        with pytest.raises(UsageError):
            parse_signal(bad)


def test_config_round_trip(tmp_path: Path) -> None:
    cfg = RunConfig(vm_id="a" * 64, name="n", image="hello", image_id="b" * 64, backend="qemu",
                    kernel="/k", system="/s", rootfs="/r", vcpus=2, memory_mib=256,
                    container=ContainerSpec(args=("echo", "hi"), env=("A=1",), user="alice"))
    path = tmp_path / "config.json"
    cfg.dump(path)
    assert RunConfig.load(path) == cfg
    assert not list(tmp_path.glob(".*tmp"))
    agent = cfg.container.to_agent({"lower": "/dev/vdb", "upper": "/dev/vdc"})
    assert agent["args"] == ["echo", "hi"] and agent["rootfs"]["lower"] == "/dev/vdb"


def test_log_opts() -> None:
    import pytest

    from micropod.errors import UsageError
    from micropod.runconfig import LogOptions, parse_log_opts

    # A guest must not fill the host's disk: bounded by default, unbounded only when asked for.
    assert parse_log_opts([]) == LogOptions(10 << 20, 3)
    assert parse_log_opts(["max-size=-1"]) == LogOptions(0, 1)
    assert parse_log_opts(["max-size=10m", "max-file=3"]) == LogOptions(10 << 20, 3)
    assert parse_log_opts(["max-size=512k"]) == LogOptions(512 << 10, 1)
    for bad in (["max-size=lots"], ["max-file=0"], ["compress=true"]):
        with pytest.raises(UsageError):
            parse_log_opts(bad)


def test_restart_policies_and_backoff() -> None:
    import pytest

    from micropod.errors import UsageError
    from micropod.runconfig import RestartPolicy, restart_backoff

    assert RestartPolicy.parse("no") == RestartPolicy()
    assert RestartPolicy.parse("on-failure:3") == RestartPolicy("on-failure", 3)
    never = RestartPolicy.parse("no")
    assert not never.wants_restart(1, 0, stopped_by_user=False)
    failing = RestartPolicy.parse("on-failure:2")
    assert failing.wants_restart(1, 1, False) and not failing.wants_restart(1, 2, False)
    assert not failing.wants_restart(0, 0, False)
    assert RestartPolicy.parse("on-failure").wants_restart(1, 100, False)
    always = RestartPolicy.parse("always")
    assert always.wants_restart(0, 5, False) and not always.wants_restart(0, 5, stopped_by_user=True)
    assert RestartPolicy.parse("unless-stopped").wants_restart(137, 0, False)
    for bad in ("sometimes", "always:3", "on-failure:x"):
        with pytest.raises(UsageError):
            RestartPolicy.parse(bad)
    delays = [restart_backoff(n) for n in range(12)]
    assert delays[0] == 0.1 and delays[1] == 0.2 and delays == sorted(delays) and delays[-1] == 60.0


def test_network_settings_round_trip_and_old_configs(tmp_path: Path) -> None:
    import json
    from dataclasses import replace

    from micropod.net.ports import PortMapping
    from micropod.runconfig import NetworkSettings

    network = NetworkSettings(mode="bridge", bridge="micropod0", subnet="10.88.0.0/16", ip="10.88.0.9",
                              mac="02:00:00:00:00:09", tap="mp-abc", ports=(PortMapping(8080, 80, "udp", "127.0.0.1"),))
    cfg = RunConfig(vm_id="a" * 64, name="n", image="hello", image_id="b" * 64, backend="qemu",
                    kernel="/k", system="/s", rootfs="/r", vcpus=1, memory_mib=256,
                    container=ContainerSpec(args=("true",), env=(), hosts="h", resolv_conf="r"), network=network)
    path = tmp_path / "config.json"
    cfg.dump(path)
    assert RunConfig.load(path) == cfg and RunConfig.load(path).network.enabled
    raw = json.loads(path.read_text())
    del raw["network"]  # written before networking existed: such a VM has no NIC
    path.write_text(json.dumps(raw))
    assert RunConfig.load(path) == replace(cfg, network=NetworkSettings())
    assert not RunConfig.load(path).network.enabled
