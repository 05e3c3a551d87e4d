from pathlib import Path

import pytest

from micropod.vmm.accel import choose_accel, kvm_verdict


def fake_host(tmp_path: Path, modules: list[str]) -> tuple[Path, Path]:
    dev = tmp_path / "kvm"
    dev.write_text("")
    mods = tmp_path / "module"
    for m in modules:
        (mods / m).mkdir(parents=True)
    mods.mkdir(exist_ok=True)
    return dev, mods


def test_pvm_host_is_not_trusted(tmp_path: Path) -> None:
    dev, mods = fake_host(tmp_path, ["kvm", "kvm_pvm"])
    verdict = kvm_verdict(dev, mods)
    assert not verdict.usable and "kvm_pvm" in verdict.reason


def test_hardware_kvm_is_used(tmp_path: Path) -> None:
    dev, mods = fake_host(tmp_path, ["kvm", "kvm_intel"])
    assert kvm_verdict(dev, mods).usable


def test_missing_device(tmp_path: Path) -> None:
    verdict = kvm_verdict(tmp_path / "nope", tmp_path)
    assert not verdict.usable and "does not exist" in verdict.reason


def test_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROPOD_ACCEL", "tcg")
    assert choose_accel() == "tcg"
