"""The guest: micropod's own kernel (a config fragment over Debian's linux-source-6.1) and the
read-only system image (a Debian Python runtime, busybox and the agent) that every VM boots."""

from micropod.guest.artefacts import GuestArtefacts, kernel_key, locate, system_key

__all__ = ["GuestArtefacts", "kernel_key", "locate", "system_key"]
