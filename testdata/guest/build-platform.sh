#!/usr/bin/env bash
# Builds a platform variant of the otherix test guest: the guest of build.sh
# (same init, same markers) plus firmware and TPM markers, for arm64 too,
# and a secure-boot variant made only of Debian-signed binaries.
#
# Usage: testdata/guest/build-platform.sh [--arch amd64|arm64] [--variant default|secureboot]
#
# Prints the absolute path of the image directory on the last line of stdout
# (guest.raw, guest.qcow2, build-info.txt); logs go to stderr.
#
# It sources build.sh's functions (everything but its final "main" call)
# and wraps a few of them, so that what build.sh gains (modules, init
# steps) this guest gains too:
#   arch_config      adds arm64 (console ttyAMA0, BOOTAA64.EFI, no BIOS loader)
#   host_tools       adds what the platform tests run: both QEMUs, OVMF,
#                    AAVMF, swtpm
#   resolve_debs     its memo file is per variant (.resolved-platform-<variant>)
#   apt_update_once  once per apt configuration (the host's, the foreign one)
#   build_initramfs  appends a second cpio archive: platform/platform.sh and
#                    platform/tpm2 under /etc/otherix, the modules they need
#                    (efivarfs), and, while init has no platform.sh hook, a
#                    copy of init with it after the "booted" marker
#   build_esp_files  secureboot: shim as EFI/BOOT/BOOTX64.EFI, signed grub as
#                    EFI/BOOT/grubx64.efi, EFI/debian/grub.cfg
#   write_build_info adds the variant
# and has a main of its own (the image folder is named for the variant).
#
# Cache: as build.sh; images in guest/platform-<arch>-<variant>-<key>/.
# Foreign .debs (arm64 on an amd64 host) come through a private apt
# configuration under apt-<arch>/ in the cache (APT_CONFIG with
# APT::Architectures {host; arm64;} and its own lists and cache): no root
# change to dpkg's architectures.
set -euo pipefail
shopt -s nullglob

PLATFORM_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
P_ARCH=amd64
VARIANT=default

p_die() {
	printf 'guest-build: error: %s\n' "$*" >&2
	exit 1
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--arch)
		[[ $# -ge 2 ]] || p_die "--arch needs a value"
		P_ARCH=$2
		shift 2
		;;
	--arch=*)
		P_ARCH=${1#*=}
		shift
		;;
	--variant)
		[[ $# -ge 2 ]] || p_die "--variant needs a value"
		VARIANT=$2
		shift 2
		;;
	--variant=*)
		VARIANT=${1#*=}
		shift
		;;
	-h | --help)
		sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
		exit 0
		;;
	*) p_die "unknown argument: $1 (usage: build-platform.sh [--arch amd64|arm64] [--variant default|secureboot])" ;;
	esac
done
case $P_ARCH/$VARIANT in
amd64/default | amd64/secureboot | arm64/default) ;;
*) p_die "unsupported arch/variant: $P_ARCH/$VARIANT (amd64/default, amd64/secureboot, arm64/default)" ;;
esac

# --- build.sh's functions ------------------------------------------------------

# Its argument parser runs at source time: give it none. Its last line runs
# main; leave that line out.
set --
# shellcheck source=/dev/null
source <(sed -E '/^main( "\$@")?[[:space:]]*$/d' "$PLATFORM_HERE/build.sh")
for f in arch_config host_tools resolve_debs apt_update_once ensure_tools missing_tools \
	resolve_debs_or_update fetch_debs image_key module_load_order build_initramfs \
	build_esp_files build write_build_info; do
	declare -F "$f" >/dev/null || p_die "build.sh has no function $f any more: update build-platform.sh"
done
HERE=$PLATFORM_HERE
ARCH=$P_ARCH

# rename_fn OLD NEW: keeps a function of build.sh under another name.
rename_fn() {
	local body
	body=$(declare -f "$1")
	eval "${body/#$1/$2}"
}

rename_fn arch_config base_arch_config
rename_fn host_tools base_host_tools
rename_fn build_initramfs base_build_initramfs
rename_fn build_esp_files base_build_esp_files
rename_fn write_build_info base_write_build_info

# --- arch and packages ---------------------------------------------------------

# shellcheck disable=SC2034 # the variables are read by build.sh's functions
arch_config() {
	case $ARCH in
	arm64)
		DEB_ARCH=arm64
		KERNEL_META=linux-image-cloud-arm64
		CONSOLE=ttyAMA0
		EFI_BOOT_NAME=BOOTAA64.EFI
		SDBOOT_EFI=systemd-bootaa64.efi
		BIOS_LOADER=none
		QEMU_SYSTEM=qemu-system-aarch64 QEMU_PACKAGE=qemu-system-arm
		UEFI_CODE=/usr/share/AAVMF/AAVMF_CODE.fd UEFI_PACKAGE=qemu-efi-aarch64
		PKG_SUFFIX=""
		if [[ $DEB_ARCH != "$(dpkg --print-architecture)" ]]; then
			PKG_SUFFIX=":$DEB_ARCH"
		fi
		;;
	*) base_arch_config ;;
	esac
	if [[ $VARIANT == secureboot ]]; then
		GUEST_PACKAGES["shim"]=shim-signed
		GUEST_PACKAGES["grub"]=grub-efi-amd64-signed
	fi
}

host_tools() {
	base_host_tools
	# What the platform tests run, whichever arch is built: both QEMUs,
	# both UEFI builds (with their interop descriptors), swtpm.
	echo "qemu-system-x86_64 qemu-system-x86"
	echo "qemu-system-aarch64 qemu-system-arm"
	echo "/usr/share/qemu/firmware/60-edk2-x86_64.json ovmf"
	echo "/usr/share/qemu/firmware/60-edk2-aarch64.json qemu-efi-aarch64"
	echo "swtpm swtpm"
	echo "swtpm_setup swtpm-tools"
}

# The resolution memo is per variant, so that build.sh and each variant do
# not overwrite each other's.
eval "$(declare -f resolve_debs | sed "s|/\.resolved|/.resolved-platform-$VARIANT|")"

declare -A APT_UPDATED_FOR=()
apt_update_once() {
	local key=${APT_CONFIG:-host}
	[[ -z ${APT_UPDATED_FOR[$key]:-} ]] || return 0
	log "apt-get update ($key)"
	apt-get update -qq >&2 || log "apt-get update failed"
	APT_UPDATED_FOR[$key]=1
}

# foreign_apt: for a guest whose .debs are of another architecture than the
# host's, point apt (through APT_CONFIG, for this script only) at lists and
# a cache of its own that know both architectures. The host's sources and
# dpkg status are used as they are; dpkg's architectures are not changed.
foreign_apt() {
	[[ -n $PKG_SUFFIX ]] || return 0
	local dir=$CACHE/apt-$DEB_ARCH host
	host=$(dpkg --print-architecture)
	mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
	cat >"$dir/apt.conf.$$" <<-EOF
		APT::Architecture "$host";
		APT::Architectures { "$host"; "$DEB_ARCH"; };
		Dir::State::Lists "$dir/lists/";
		Dir::Cache "$dir/cache/";
		APT::Sandbox::User "root";
		Acquire::Languages "none";
	EOF
	mv -f "$dir/apt.conf.$$" "$dir/apt.conf"
	export APT_CONFIG=$dir/apt.conf
}

# --- image -----------------------------------------------------------------------

# Modules platform.sh loads (each after its dependencies): efivarfs, and
# tpm_tis for tpm-tis-device on arm64 (built in on amd64, then skipped).
PLATFORM_MODULES=(efivarfs tpm_tis)

# The line /init needs after its "booted" marker.
HOOK='[ -x /etc/otherix/platform.sh ] && /etc/otherix/platform.sh'

build_initramfs() {
	base_build_initramfs "$@"
	local work=$1 root=$1/platform-initramfs moddir path
	moddir=$work/kernel/lib/modules/$KVER
	mkdir -p "$root/etc/otherix"
	install -m 0755 "$HERE/platform/platform.sh" "$root/etc/otherix/platform.sh"
	install -m 0755 "$HERE/platform/tpm2" "$root/etc/otherix/tpm2"
	(
		# shellcheck disable=SC2034 # read by module_load_order
		WANT_MODULES=("${PLATFORM_MODULES[@]}")
		module_load_order "$moddir"
	) >"$root/etc/otherix/platform-modules"
	while read -r path _; do
		install -D -m 0644 "$moddir/$path" "$root/lib/modules/$KVER/$path"
	done <"$root/etc/otherix/platform-modules"
	if ! grep -qF '/etc/otherix/platform.sh' "$HERE/init"; then
		# init has no hook yet: ship a copy that has it.
		awk -v hook="$HOOK" '{ print } /^echo "OTHERIX-GUEST booted / { print hook; n++ }
			END { exit n == 1 ? 0 : 1 }' "$HERE/init" >"$root/init" ||
			die "cannot find the booted marker in init to hook platform.sh after it"
		chmod 0755 "$root/init"
	fi
	# The kernel unpacks concatenated archives in order; later files win.
	(cd "$root" && find . -print0 | LC_ALL=C sort -z |
		cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
		gzip -n -6 >>"$work/initrd.img"
}

build_esp_files() {
	base_build_esp_files "$@"
	[[ $VARIANT == secureboot ]] || return 0
	local work=$1 esp=$1/esp
	# shim (signed by Microsoft's UEFI CA) loads grubx64.efi from its own
	# folder; the signed grub (Debian's key, which shim trusts) has the
	# prefix /EFI/debian and verifies the kernel (Debian-signed) through shim.
	cp "$work/shim/usr/lib/shim/shimx64.efi.signed" "$esp/EFI/BOOT/BOOTX64.EFI"
	cp "$work/grub/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" "$esp/EFI/BOOT/grubx64.efi"
	mkdir -p "$esp/EFI/debian"
	cat >"$esp/EFI/debian/grub.cfg" <<-EOF
		set timeout=0
		linux /vmlinuz $(cmdline)
		initrd /initrd.img
		boot
	EOF
}

write_build_info() {
	base_write_build_info "$@"
	local out=$2
	{
		echo "variant: $VARIANT"
		echo "platform: /etc/otherix/platform.sh, /etc/otherix/tpm2, modules ${PLATFORM_MODULES[*]}"
		if [[ $VARIANT == secureboot ]]; then
			echo "secureboot: EFI/BOOT/BOOTX64.EFI = shimx64.efi.signed, EFI/BOOT/grubx64.efi = grubx64.efi.signed, EFI/debian/grub.cfg"
		fi
	} >>"$out/build-info.txt"
}

platform_key() {
	{
		image_key
		echo "variant $VARIANT"
	} | sha256sum | cut -c1-16
}

platform_prune() {
	find "$CACHE/guest" -mindepth 1 -maxdepth 1 -name "platform-$ARCH-$VARIANT-*" -type d \
		! -path "$IMAGE_DIR" -mtime +0 -exec rm -rf {} + 2>/dev/null || true
}

platform_main() {
	arch_config
	mkdir -p "$CACHE/guest" "$CACHE/debs/$ARCH"

	# Fast path, without the lock.
	if [[ -z $(missing_tools) ]]; then
		foreign_apt
		if resolve_debs 2>/dev/null; then
			KEY=$(platform_key)
			IMAGE_DIR=$CACHE/guest/platform-$ARCH-$VARIANT-$KEY
			if [[ -f $IMAGE_DIR/guest.raw ]]; then
				touch "$IMAGE_DIR"
				echo "$IMAGE_DIR"
				return 0
			fi
		fi
	fi

	# The same lock as build.sh: both clear .tmp-<arch>-* under it.
	exec 9>"$CACHE/guest/.lock-$ARCH"
	flock 9
	rm -rf "$CACHE/guest/.tmp-$ARCH-"*
	(
		unset APT_CONFIG # host tools come from the host's apt
		ensure_tools
	)
	foreign_apt
	resolve_debs_or_update
	KEY=$(platform_key)
	IMAGE_DIR=$CACHE/guest/platform-$ARCH-$VARIANT-$KEY
	if [[ ! -f $IMAGE_DIR/guest.raw ]]; then
		local t0=$SECONDS
		fetch_debs
		log "building $IMAGE_DIR"
		build
		log "built in $((SECONDS - t0)) s"
		platform_prune
	fi
	echo "$IMAGE_DIR"
}

platform_main
