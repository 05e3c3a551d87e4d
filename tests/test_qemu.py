from pathlib import Path

from micropod.vmm.base import Drive, NetInterface, VmSpec
from micropod.vmm.qemu import QemuLayout, qemu_argv


def spec(tmp_path: Path) -> VmSpec:
    return VmSpec(
        vm_id="a" * 64, kernel=Path("/k/vmlinux"), cmdline="console=ttyS0 quiet", vcpus=2, memory_mib=512,
        drives=(Drive("system", Path("/s.sqfs"), True, True), Drive("rootfs", Path("/r.sqfs"), True),
                Drive("upper", tmp_path / "upper.ext4", False)),
        run_dir=tmp_path, console_log=tmp_path / "console.log",
        nets=(NetInterface("net0", "mp-tap0", "02:00:00:00:00:01"),),
    )


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_is_a_microvm_with_every_device(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path), Path("/usr/bin/qemu"), "tcg", QemuLayout.in_dir(tmp_path))
    assert argv[0] == "/usr/bin/qemu"
    assert values(argv, "-M")[0].startswith("microvm,")
    assert "acpi=off" in values(argv, "-M")[0]
    assert values(argv, "-accel") == ["tcg"]
    assert values(argv, "-cpu") == ["max"]
    assert values(argv, "-smp") == ["2"] and values(argv, "-m") == ["512M"]
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert values(argv, "-kernel") == ["/k/vmlinux"]
    assert values(argv, "-append") == ["console=ttyS0 quiet"]
    drives = values(argv, "-drive")
    assert [d.split(",")[0] for d in drives] == ["id=system", "id=rootfs", "id=upper"]
    assert "readonly=on" in drives[0] and "readonly=on" in drives[1] and "readonly=on" not in drives[2]
    devices = values(argv, "-device")
    assert "virtio-rng-device,rng=rng0" in devices
    assert any(d.startswith("virtserialport,") and "name=micropod.agent" in d for d in devices)
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01" in devices
    assert any("ifname=mp-tap0" in n for n in values(argv, "-netdev"))
    # bare names: QEMU runs in the VM's directory, so deep state roots stay within sun_path's limit
    assert "socket,id=agent,path=agent.sock" in values(argv, "-chardev")
    assert values(argv, "-qmp") == ["unix:qmp.sock,server=on,wait=off"]


def test_kvm_uses_host_cpu(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path), Path("/q"), "kvm", QemuLayout.in_dir(tmp_path))
    assert values(argv, "-cpu") == ["host"] and values(argv, "-accel") == ["kvm"]


def test_qemu_runs_in_its_own_seccomp_sandbox_unless_confinement_is_lifted(tmp_path: Path) -> None:
    from dataclasses import replace

    confined = qemu_argv(spec(tmp_path), Path("/usr/bin/qemu"), "tcg", QemuLayout.in_dir(tmp_path))
    assert values(confined, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    lifted = qemu_argv(replace(spec(tmp_path), confined=False), Path("/usr/bin/qemu"), "tcg",
                       QemuLayout.in_dir(tmp_path))
    assert values(lifted, "-sandbox") == []


def test_a_share_is_named_by_its_path_in_the_jail_when_confined(tmp_path: Path) -> None:
    from dataclasses import replace

    from micropod.vmm.base import Share
    from micropod.vmm.qemu_confined import Handles

    shared = replace(spec(tmp_path), drives=(), nets=(), shares=(Share("h0", Path("/data,x"), True),))
    open_argv = qemu_argv(shared, Path("/q"), "tcg", QemuLayout.in_dir(tmp_path))
    assert values(open_argv, "-fsdev") == ["local,id=h0,path=/data,,x,security_model=mapped-xattr,readonly=on"]
    jailed = qemu_argv(shared, Path("/q"), "tcg", QemuLayout.in_dir(tmp_path), Handles(agent=5, qmp=6))
    assert values(jailed, "-fsdev") == ["local,id=h0,path=/shares/h0,security_model=mapped-xattr,readonly=on"]
    assert "virtio-9p-device,fsdev=h0,mount_tag=h0" in values(jailed, "-device")
