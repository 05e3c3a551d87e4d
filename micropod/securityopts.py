"""docker's security options as data: capability names checked, seccomp profiles read; the CLI's flags and the
CRI's security context both end here."""

from __future__ import annotations

import json
from pathlib import Path

from micropod.errors import UsageError
from micropod.runconfig import SecurityOptions

MAX_PROFILE = 1 << 20


def capability(raw: str) -> str:
    from micropod.runtime import caps

    name = raw.upper()
    name = name if name.startswith("CAP_") else f"CAP_{name}"
    if name != "CAP_ALL" and name not in caps.NUMBERS:
        raise UsageError(f"unknown capability: {raw!r}")
    return name


def parse(privileged: bool, cap_add: tuple[str, ...], cap_drop: tuple[str, ...],
          security_opt: tuple[str, ...]) -> SecurityOptions:
    seccomp, no_new_privileges, vmm_confinement = "default", False, True
    for opt in security_opt:
        key, sep, value = opt.partition("=" if "=" in opt else ":")
        if key == "no-new-privileges":
            if value not in ("", "true", "false"):
                raise UsageError(f"invalid --security-opt {opt!r}: no-new-privileges takes true or false")
            no_new_privileges = value != "false"
        elif key == "seccomp" and sep:
            seccomp = value if value == "unconfined" else profile(Path(value))
        elif key == "vmm-confinement" and value in ("on", "off"):
            vmm_confinement = value == "on"
        else:
            raise UsageError(f"invalid --security-opt {opt!r}: micropod knows seccomp=, no-new-privileges and "
                             "vmm-confinement=on|off")
    return SecurityOptions(privileged=privileged, cap_add=tuple(capability(c) for c in cap_add),
                           cap_drop=tuple(capability(c) for c in cap_drop), seccomp=seccomp,
                           no_new_privileges=no_new_privileges, vmm_confinement=vmm_confinement)


def profile(path: Path) -> str:
    from micropod.jsonfile import read_json_object

    loaded = read_json_object(path, MAX_PROFILE, f"--security-opt seccomp={path}: the profile")
    return json.dumps(loaded)
