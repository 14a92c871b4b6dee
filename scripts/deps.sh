#!/usr/bin/env bash
# Installs the Debian packages otherix-agent and its tests need, only those
# missing. Idempotent; runs apt-get update at most once.
set -euo pipefail
want=(qemu-system-x86 qemu-system-arm qemu-efi-aarch64 qemu-utils ovmf swtpm swtpm-tools mtools dosfstools syslinux syslinux-common isolinux
      genisoimage cpio xz-utils curl ca-certificates)
if [ "${1:-}" = "--test" ]; then
  want+=(systemd systemd-container debootstrap iproute2 dnsmasq-base util-linux libarchive-tools etcd-server)
  # The Debian test image (testdata/debian/build.sh): debootstrap above,
  # mkfs.ext4 -d for its root file system.
  want+=(e2fsprogs)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  echo "note: add /usr/local/go/bin to PATH" >&2
fi
# The unprivileged user QEMU runs as (config qemu.user).
if ! getent passwd otherix-qemu >/dev/null; then
  echo "creating user otherix-qemu" >&2
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin otherix-qemu
fi
