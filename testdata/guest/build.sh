#!/usr/bin/env bash
# Builds the otherix test guest: a tiny bootable disk (Debian's cloud kernel +
# a busybox initramfs whose /init prints "OTHERIX-GUEST ..." markers on the
# serial console) that every integration test boots in QEMU.
#
# Usage: testdata/guest/build.sh [--arch amd64]
#
# Prints the absolute path of the image directory on the last line of stdout
# (guest.raw, guest.qcow2, build-info.txt); logs go to stderr.
#
# Cache root: ${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}
#   debs/<arch>/          .deb files, fetched with apt-get download, reused
#   guest/<arch>-<key>/   the image; key = sha256 over this folder's files,
#                         the arch and the .deb file names
# The build runs under flock in a temporary folder renamed into place, so
# parallel test processes build once and never see half an image.
#
# How the pieces fit (extend here rather than rewrite):
#   arch_config    per-arch package names, console, EFI file names
#   host_tools     the host commands needed and their Debian packages
#   resolve_debs   which .deb files make the guest (names decide the key)
#   build_initramfs, build_esp_files, build_fat, build_disk: the image
set -euo pipefail
shopt -s nullglob

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}
ARCH=amd64

log() { printf 'guest-build: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--arch)
		[[ $# -ge 2 ]] || die "--arch needs a value"
		ARCH=$2
		shift 2
		;;
	--arch=*)
		ARCH=${1#*=}
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown argument: $1 (usage: build.sh [--arch amd64])" ;;
	esac
done

# What the initramfs loads, in this order, each module after its
# dependencies. Lines starting with @ are steps of /init between modules;
# a module starting with ? is loaded where the kernel has it (Debian's
# arm64 cloud kernel is built without pvpanic).
# SCSI: scsi_mod scan=manual, because a full scan of virtio-scsi's 256
# targets costs about 6 s under TCG; /init scans targets 0-7 itself (@scsi_scan)
# and only then loads sd_mod and sr_mod, whose probes insmod waits for.
WANT_MODULES=(button evdev scsi_mod
	virtio_pci virtio_blk virtio_scsi virtio_net virtio_console virtio_balloon nvme '?pvpanic_pci'
	@scsi_scan sd_mod sr_mod isofs)
declare -A MODULE_ARGS=([scsi_mod]="scan=manual")

# Kernel command line, for every boot loader.
cmdline() { echo "console=$CONSOLE quiet loglevel=3 mitigations=off no_timer_check"; }

arch_config() {
	case $ARCH in
	amd64)
		DEB_ARCH=amd64
		KERNEL_META=linux-image-cloud-amd64
		CONSOLE=ttyS0
		EFI_BOOT_NAME=BOOTX64.EFI
		SDBOOT_EFI=systemd-bootx64.efi
		BIOS_LOADER=syslinux
		QEMU_SYSTEM=qemu-system-x86_64 QEMU_PACKAGE=qemu-system-x86
		UEFI_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd UEFI_PACKAGE=ovmf
		;;
	# arm64 (to come): DEB_ARCH=arm64 (needs `dpkg --add-architecture arm64`
	# and an apt-get update), KERNEL_META=linux-image-cloud-arm64,
	# CONSOLE=ttyAMA0, EFI_BOOT_NAME=BOOTAA64.EFI,
	# SDBOOT_EFI=systemd-bootaa64.efi, BIOS_LOADER=none,
	# QEMU_SYSTEM=qemu-system-aarch64 QEMU_PACKAGE=qemu-system-arm,
	# UEFI_CODE=/usr/share/AAVMF/AAVMF_CODE.fd UEFI_PACKAGE=qemu-efi-aarch64.
	*) die "unsupported arch: $ARCH (supported: amd64)" ;;
	esac
	# Packages named with :arch when the guest is foreign to the host.
	PKG_SUFFIX=""
	if [[ $DEB_ARCH != "$(dpkg --print-architecture)" ]]; then
		PKG_SUFFIX=":$DEB_ARCH"
	fi
}

# --- host tools --------------------------------------------------------------

# command-or-path → Debian package
host_tools() {
	cat <<-EOF
		apt-get apt
		dpkg-deb dpkg
		flock util-linux
		sha256sum coreutils
		cpio cpio
		gzip gzip
		mkfs.fat dosfstools
		mcopy mtools
		mmd mtools
		qemu-img qemu-utils
		readelf binutils
	EOF
	if [[ $BIOS_LOADER == syslinux ]]; then
		echo "syslinux syslinux"
		echo "/usr/lib/syslinux/mbr/mbr.bin syslinux-common"
		echo "/usr/lib/syslinux/modules/bios/ldlinux.c32 syslinux-common"
		echo "/usr/lib/ISOLINUX/isolinux.bin isolinux"
		echo "genisoimage genisoimage"
	fi
	# Not for the build: what the tests that boot this guest run.
	echo "$QEMU_SYSTEM $QEMU_PACKAGE"
	echo "$UEFI_CODE $UEFI_PACKAGE"
	echo "genisoimage genisoimage"
}

APT_UPDATED=0
apt_update_once() {
	[[ $APT_UPDATED == 0 ]] || return 0
	log "apt-get update"
	apt-get update -qq >&2 || log "apt-get update failed"
	APT_UPDATED=1
}

# Prints the packages of the missing host tools.
missing_tools() {
	local cmd pkg
	while read -r cmd pkg; do
		if [[ $cmd == /* ]]; then
			[[ -e $cmd ]] && continue
		else
			command -v "$cmd" >/dev/null && continue
		fi
		echo "$pkg"
	done < <(host_tools) | sort -u
}

ensure_tools() {
	local missing
	mapfile -t missing < <(missing_tools)
	[[ ${#missing[@]} -gt 0 ]] || return 0
	log "installing host tools: ${missing[*]}"
	apt_update_once
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${missing[@]}" >&2 || die "cannot install ${missing[*]}"
}

# --- .deb files --------------------------------------------------------------

# Guest packages besides the kernel (resolved from $KERNEL_META's dependency),
# by role. The roles name the unpacked trees in build().
# qga: qemu-guest-agent and the libraries of its binary (readelf -d NEEDED,
# followed in build_initramfs; a library missing here fails the build).
# netcat: netcat-traditional, for "nc.traditional -u -l -p PORT -e /bin/cat"
# (a UDP echo server; busybox's nc has no -u).
declare -A GUEST_PACKAGES=([busybox]=busybox-static [sdboot]=systemd-boot-efi
	[qga]=qemu-guest-agent [libc]=libc6 [glib]=libglib2.0-0 [pcre]=libpcre2-8-0
	[udev]=libudev1 [numa]=libnuma1 [uring]=liburing2 [netcat]=netcat-traditional)

# Dynamically linked guest programs: unpacked path → path in the initramfs.
declare -A GUEST_BINARIES=([qga/usr/sbin/qemu-ga]=/usr/sbin/qemu-ga
	[netcat/bin/nc.traditional]=/bin/nc.traditional)

# Sets PKGS, DEBS and SUMS: role → package, .deb file name, sha256. Fails
# if apt's lists do not know the packages. Remembered in
# $CACHE/debs/<arch>/.resolved until apt's lists change, since each apt-cache
# call costs about half a second.
resolve_debs() {
	local memo=$CACHE/debs/$ARCH/.resolved want role pkg file sum uris tmp
	want="v1 $ARCH $KERNEL_META $(for role in "${!GUEST_PACKAGES[@]}"; do
		echo "$role=${GUEST_PACKAGES[$role]}"
	done | LC_ALL=C sort | tr '\n' ' ')"
	local lists=/var/lib/apt/lists
	eval "$(apt-config shell lists Dir::State::lists/d 2>/dev/null)"
	declare -gA PKGS=() DEBS=() SUMS=()
	if [[ -f $memo && $memo -nt $lists && "$(head -n 1 "$memo")" == "$want" ]]; then
		while read -r role pkg file sum; do
			PKGS[$role]=$pkg DEBS[$role]=$file SUMS[$role]=$sum
		done < <(tail -n +2 "$memo")
		[[ ${#DEBS[@]} -eq $((${#GUEST_PACKAGES[@]} + 1)) ]] && return 0
		PKGS=() DEBS=() SUMS=()
	fi

	pkg=$(apt-cache depends "$KERNEL_META$PKG_SUFFIX" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { sub(/:.*/, "", $2); print $2; exit }')
	[[ -n $pkg ]] || return 1
	PKGS[kernel]=$pkg
	for role in "${!GUEST_PACKAGES[@]}"; do
		PKGS[$role]=${GUEST_PACKAGES[$role]}
	done
	local names=()
	for role in "${!PKGS[@]}"; do
		names+=("${PKGS[$role]}$PKG_SUFFIX")
	done
	# --print-uris lists nothing for files already in the current folder:
	# ask from an empty one. Lines: 'URI' FILE SIZE SHA256:HEX
	tmp=$(mktemp -d)
	uris=$(cd "$tmp" && apt-get download --print-uris "${names[@]}" 2>/dev/null) || {
		rmdir "$tmp"
		return 1
	}
	rmdir "$tmp"
	for role in "${!PKGS[@]}"; do
		file="" sum=""
		read -r file sum < <(awk -v p="${PKGS[$role]}_" \
			'index($2, p) == 1 { sub(/^SHA256:/, "", $4); print $2, $4 }' <<<"$uris")
		[[ -n ${file:-} && -n ${sum:-} ]] || return 1
		DEBS[$role]=$file SUMS[$role]=$sum
	done
	{
		echo "$want"
		for role in "${!PKGS[@]}"; do
			echo "$role ${PKGS[$role]} ${DEBS[$role]} ${SUMS[$role]}"
		done
	} >"$memo.$$" && mv -f "$memo.$$" "$memo"
}

resolve_debs_or_update() {
	resolve_debs && return 0
	apt_update_once
	resolve_debs || die "apt cannot resolve $KERNEL_META, ${GUEST_PACKAGES[*]} for $DEB_ARCH"
}

deb_ok() { # file expected-sha256
	[[ -f $1 ]] && [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]]
}

fetch_debs() {
	local role name sum dir=$CACHE/debs/$ARCH
	mkdir -p "$dir"
	for role in "${!DEBS[@]}"; do
		name=${DEBS[$role]}
		sum=${SUMS[$role]}
		deb_ok "$dir/$name" "$sum" && continue
		rm -f "$dir/$name"
		log "downloading ${PKGS[$role]}"
		# The download runs as root: tell apt not to drop to _apt, which
		# cannot write the cache folder.
		if ! (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root \
			"${PKGS[$role]}$PKG_SUFFIX" >&2); then
			apt_update_once
			(cd "$dir" && apt-get download -q -o APT::Sandbox::User=root \
				"${PKGS[$role]}$PKG_SUFFIX" >&2) || die "cannot download ${PKGS[$role]}"
		fi
		deb_ok "$dir/$name" "$sum" || die "$name: missing or checksum mismatch after download"
	done
}

image_key() {
	{
		(cd "$HERE" && find . -type f ! -name "*.md" -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
		echo "arch $ARCH"
		printf '%s\n' "${DEBS[@]}" | LC_ALL=C sort
	} | sha256sum | cut -c1-16
}

# --- image ---------------------------------------------------------------------

# Prints "path args" lines for WANT_MODULES and their dependencies, every
# module after those it depends on. $1 = the unpacked kernel's module folder.
module_load_order() {
	local moddir=$1 path name
	declare -gA MOD_PATH=() MOD_SEEN=()
	while read -r path; do
		name=${path##*/}
		name=${name%.ko*}
		MOD_PATH[${name//-/_}]=$path
	done <"$moddir/modules.order"
	local m
	for m in "${WANT_MODULES[@]}"; do
		visit_module "$moddir" "$m"
	done
}

visit_module() {
	local moddir=$1 m=$2 dep deps optional=
	if [[ $m == @* ]]; then
		echo "$m"
		return 0
	fi
	if [[ $m == \?* ]]; then
		m=${m#?}
		optional=1
	fi
	[[ -z ${MOD_SEEN[$m]:-} ]] || return 0
	MOD_SEEN[$m]=1
	if [[ -z ${MOD_PATH[$m]:-} ]]; then
		if grep -qE "/${m//_/[-_]}\.ko" "$moddir/modules.builtin"; then
			return 0
		fi
		[[ -z $optional ]] || return 0
		die "kernel module $m not found"
	fi
	# The .modinfo section holds NUL-terminated "key=value" strings.
	deps=$(tr '\0' '\n' <"$moddir/${MOD_PATH[$m]}" | sed -n 's/^depends=//p' | head -n 1)
	for dep in ${deps//,/ }; do
		visit_module "$moddir" "${dep//-/_}"
	done
	echo "${MOD_PATH[$m]} ${MODULE_ARGS[$m]:-}"
}

# find_lib WORK NAME: the unpacked library NAME (a soname), from the lib
# folders of the guest packages' trees.
find_lib() {
	local work=$1 name=$2 role f
	for role in $(printf "%s\n" "${!GUEST_PACKAGES[@]}" | LC_ALL=C sort); do
		for f in "$work/$role"/{lib,usr/lib}/*/"$name" "$work/$role"/{lib,usr/lib}/"$name"; do
			[[ -e $f ]] && {
				echo "$f"
				return 0
			}
		done
	done
	return 1
}

# install_elf WORK ROOT SRC DEST: copies the ELF program SRC to ROOT/DEST
# with its interpreter and, transitively, the libraries it needs, each
# into ROOT at the path it has in its package (dereferenced).
install_elf() {
	local work=$1 root=$2 src=$3 dest=$4 interp f lib rel
	install -D -m 0755 "$src" "$root$dest"
	interp=$(readelf -lW "$src" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
	if [[ -n $interp && ! -e $root$interp ]]; then
		f=$(find_lib "$work" "${interp##*/}") || die "$dest: interpreter $interp not in the guest packages"
		install -D -m 0755 "$(readlink -f "$f")" "$root$interp"
	fi
	local todo=("$src") seen=" "
	while [[ ${#todo[@]} -gt 0 ]]; do
		f=${todo[0]}
		todo=("${todo[@]:1}")
		for lib in $(readelf -dW "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
			# The interpreter is known to itself by its soname.
			[[ $seen == *" $lib "* || $lib == "${interp##*/}" ]] && continue
			seen+="$lib "
			local found
			found=$(find_lib "$work" "$lib") || die "$dest needs $lib: not in the guest packages"
			rel=${found#"$work"/*/}
			rel=/${rel#usr/}
			[[ -e $root$rel ]] || install -D -m 0755 "$(readlink -f "$found")" "$root$rel"
			todo+=("$found")
		done
	done
}

# build_initramfs WORK: writes $WORK/initrd.img
build_initramfs() {
	local work=$1 root=$1/initramfs kroot=$1/kernel moddir path
	mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,mnt,root,etc/otherix,etc/acpi/PWRF,var/log}
	cp "$work/busybox/bin/busybox" "$root/bin/busybox"
	install -m 0755 "$HERE/init" "$root/init"
	install -m 0755 "$HERE/acpi-power" "$root/etc/acpi/PWRF/00000080"
	install -m 0755 "$HERE/udhcpc.script" "$root/etc/otherix/udhcpc.script"
	echo "$ARCH" >"$root/etc/otherix/arch"
	local bin
	for bin in "${!GUEST_BINARIES[@]}"; do
		install_elf "$work" "$root" "$work/$bin" "${GUEST_BINARIES[$bin]}"
	done

	moddir=$kroot/lib/modules/$KVER
	module_load_order "$moddir" >"$root/etc/otherix/modules"
	while read -r path _; do
		[[ $path == @* ]] && continue
		install -D -m 0644 "$moddir/$path" "$root/lib/modules/$KVER/$path"
	done <"$root/etc/otherix/modules"
	cp "$moddir/modules.order" "$moddir/modules.builtin" "$root/lib/modules/$KVER/"

	(cd "$root" && find . -print0 | LC_ALL=C sort -z |
		cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
		gzip -n -6 >"$work/initrd.img"
}

# build_esp_files WORK: the tree copied onto the FAT ($WORK/esp)
build_esp_files() {
	local work=$1 esp=$1/esp
	mkdir -p "$esp"
	cp "$work/kernel/boot/vmlinuz-$KVER" "$esp/vmlinuz"
	cp "$work/initrd.img" "$esp/initrd.img"
	if [[ $BIOS_LOADER == syslinux ]]; then
		cat >"$esp/syslinux.cfg" <<-EOF
			DEFAULT guest
			PROMPT 0
			TIMEOUT 0
			LABEL guest
			  KERNEL /vmlinuz
			  INITRD /initrd.img
			  APPEND $(cmdline)
		EOF
	fi
	# UEFI: systemd-boot as the removable-media loader, so OVMF (or AAVMF)
	# boots the same disk.
	mkdir -p "$esp/EFI/BOOT" "$esp/loader/entries"
	cp "$work/sdboot/usr/lib/systemd/boot/efi/$SDBOOT_EFI" "$esp/EFI/BOOT/$EFI_BOOT_NAME"
	cat >"$esp/loader/loader.conf" <<-EOF
		default otherix.conf
		timeout 0
		editor no
	EOF
	cat >"$esp/loader/entries/otherix.conf" <<-EOF
		title otherix test guest
		linux /vmlinuz
		initrd /initrd.img
		options $(cmdline)
	EOF
}

PART_START=2048 # sectors: the FAT partition starts at 1 MiB

# build_fat WORK: $WORK/fat.img, a FAT16 file system holding $WORK/esp
build_fat() {
	local work=$1 fat=$1/fat.img kib
	kib=$(du -s -k --apparent-size "$work/esp" | cut -f1)
	kib=$(((kib + 2048 + 1023) / 1024 * 1024)) # slack, whole MiB
	[[ $kib -ge 16384 ]] || kib=16384          # FAT16 wants >= 4085 clusters
	mkfs.fat -F 16 -n OTHERIX -i 4f545831 -h "$PART_START" -C "$fat" "$kib" >/dev/null
	(cd "$work/esp" && mcopy -i "$fat" -s -p -Q -m ./* ::/)
	if [[ $BIOS_LOADER == syslinux ]]; then
		syslinux --install "$fat"
	fi
}

le32() { # value → printf escapes of its 4 little-endian bytes
	printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) \
		$((($1 >> 16) & 255)) $((($1 >> 24) & 255))
}

# build_iso WORK OUT: OUT/guest.iso, the same kernel and initramfs as a
# bootable El Torito CD (isolinux), whose command line says
# otherix.boot=cdrom: boot-order tests tell which device booted.
build_iso() {
	local work=$1 iso=$1/iso
	mkdir -p "$iso/isolinux"
	cp "$work/esp/vmlinuz" "$work/esp/initrd.img" "$iso/"
	cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$iso/isolinux/"
	cat >"$iso/isolinux/isolinux.cfg" <<-EOF
		DEFAULT guest
		PROMPT 0
		TIMEOUT 0
		LABEL guest
		  KERNEL /vmlinuz
		  INITRD /initrd.img
		  APPEND $(cmdline) otherix.boot=cdrom
	EOF
	genisoimage -quiet -V otherix-boot -o "$2/guest.iso" -b isolinux/isolinux.bin -c isolinux/boot.cat \
		-no-emul-boot -boot-load-size 4 -boot-info-table "$iso" >&2
}

# build_disk WORK OUT: OUT/guest.raw, an MBR disk with the FAT as its one,
# active partition (type 0x0e: FAT16 LBA), syslinux's boot code in front.
build_disk() {
	local work=$1 raw=$2/guest.raw sectors entry
	sectors=$(($(stat -c %s "$work/fat.img") / 512))
	truncate -s $(((PART_START + sectors) * 512)) "$raw"
	if [[ $BIOS_LOADER == syslinux ]]; then
		dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
	fi
	# disk signature, then the entry: active, CHS unused (LBA), type, start, size
	entry="$(le32 0x4f545831)\\x00\\x00"
	entry+="\\x80\\xfe\\xff\\xff\\x0e\\xfe\\xff\\xff$(le32 "$PART_START")$(le32 "$sectors")"
	# shellcheck disable=SC2059 # the format is built from escapes on purpose
	printf "$entry" | dd of="$raw" bs=1 seek=440 conv=notrunc status=none
	printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none
	dd if="$work/fat.img" of="$raw" bs=512 seek="$PART_START" conv=notrunc status=none
}

write_build_info() {
	local work=$1 out=$2 role
	{
		echo "arch: $ARCH"
		echo "key: $KEY"
		echo "kernel: $KVER"
		echo "cmdline: $(cmdline)"
		for role in $(printf "%s\n" "${!DEBS[@]}" | LC_ALL=C sort); do
			echo "deb.$role: ${DEBS[$role]}"
		done
		echo "modules: $(cut -d' ' -f1 "$work/initramfs/etc/otherix/modules" | sed 's,.*/,,; s,\.ko.*,,' | tr '\n' ' ')"
		echo "bios: $BIOS_LOADER (MBR, FAT16 partition at sector $PART_START)"
		echo "uefi: EFI/BOOT/$EFI_BOOT_NAME = $SDBOOT_EFI"
		echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
		(cd "$out" && sha256sum guest.raw guest.qcow2)
	} >"$out/build-info.txt"
}

build() {
	local work out role
	work=$(mktemp -d "$CACHE/guest/.tmp-$ARCH-XXXXXX")
	# shellcheck disable=SC2064 # expand now: work is local
	trap "rm -rf '$work'" EXIT
	for role in $(printf "%s\n" "${!DEBS[@]}" | LC_ALL=C sort); do
		dpkg-deb -x "$CACHE/debs/$ARCH/${DEBS[$role]}" "$work/$role"
	done
	local kv=("$work"/kernel/lib/modules/*)
	[[ ${#kv[@]} -eq 1 ]] || die "expected one kernel in ${DEBS[kernel]}"
	KVER=${kv[0]##*/}

	build_initramfs "$work"
	build_esp_files "$work"
	build_fat "$work"
	out=$work/out
	mkdir -p "$out"
	build_disk "$work" "$out"
	qemu-img convert -f raw -O qcow2 "$out/guest.raw" "$out/guest.qcow2"
	if [[ $BIOS_LOADER == syslinux ]]; then
		build_iso "$work" "$out"
	fi
	write_build_info "$work" "$out"
	chmod 0444 "$out"/*
	chmod 0755 "$out"
	mv -T "$out" "$IMAGE_DIR"
	rm -rf "$work"
	trap - EXIT
}

# Images of this arch unused for a day go (a rebuild costs seconds).
prune() {
	find "$CACHE/guest" -mindepth 1 -maxdepth 1 -name "$ARCH-*" -type d \
		! -path "$IMAGE_DIR" -mtime +0 -exec rm -rf {} + 2>/dev/null || true
}

main() {
	arch_config
	mkdir -p "$CACHE/guest" "$CACHE/debs/$ARCH"

	# Fast path, without the lock: the image is already there.
	if [[ -z $(missing_tools) ]] && resolve_debs 2>/dev/null; then
		KEY=$(image_key)
		IMAGE_DIR=$CACHE/guest/$ARCH-$KEY
		if [[ -f $IMAGE_DIR/guest.raw ]]; then
			touch "$IMAGE_DIR"
			echo "$IMAGE_DIR"
			return 0
		fi
	fi

	exec 9>"$CACHE/guest/.lock-$ARCH"
	flock 9
	# Under the lock, a temporary folder is what a killed build left.
	rm -rf "$CACHE/guest/.tmp-$ARCH-"*
	ensure_tools
	resolve_debs_or_update
	KEY=$(image_key)
	IMAGE_DIR=$CACHE/guest/$ARCH-$KEY
	if [[ ! -f $IMAGE_DIR/guest.raw ]]; then
		local t0=$SECONDS
		fetch_debs
		log "building $IMAGE_DIR"
		build
		log "built in $((SECONDS - t0)) s"
		prune
	fi
	echo "$IMAGE_DIR"
}

main
