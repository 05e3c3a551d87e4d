#!/usr/bin/env bash
# Idempotent host setup on Debian bookworm: installs only the packages that are missing.
set -euo pipefail

packages=(
  qemu-system-x86            # the QEMU microvm backend
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils  # guest kernel
  busybox-static             # guest userland and the demo image
  squashfs-tools-ng          # tar2sqfs: layers to squashfs without root
  e2fsprogs                  # mkfs.ext4 for each VM's writable layer
  zstd
  docker-registry skopeo umoci  # test oracles and a real registry for tests
  squashfs-tools openssl        # mksquashfs (unpack benchmark baseline); a throwaway CA for TLS tests
  nftables iproute2
  runc crun containerd libseccomp2  # OCI runtime references (crun: benchmark only) and a real client
  python3-venv
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: these packages are missing and installing them needs root: ${missing[*]}" >&2
  exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# docker-registry and containerd start system services on install; tests run their own daemons.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now docker-registry containerd >/dev/null 2>&1 || true
fi
