#!/usr/bin/env bash
# Builds a Debian 12 (bookworm) cloud image from Debian packages, for the
# test that boots a real distribution through the agent: debootstrap's
# minbase variant plus the cloud kernel, cloud-init, qemu-guest-agent,
# systemd, udev and D-Bus (for logind, which handles the power button).
#
# Usage: testdata/debian/build.sh
#
# Prints the absolute path of the image directory on the last line of stdout
# (debian.qcow2, build-info.txt); logs go to stderr.
#
# Cache root: ${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}
#   debs/debian-bookworm-amd64/   debootstrap's --cache-dir (.deb files, reused)
#   debian/bookworm-amd64-<key>/  the image; key = sha256 over this folder's
#                                 files (README excepted) and the candidate
#                                 versions, in apt's lists, of the packages
#                                 named here and of the boot loader's
# The build runs under flock in a temporary folder renamed into place, so
# parallel test processes build once and never see half an image.
#
# The mirror is the first Debian archive of the host's apt sources serving
# bookworm (or $OTHERIX_DEBIAN_MIRROR).
#
# Disk: MBR, partition 1 = FAT16 at 1 MiB with the kernel, the initramfs,
# syslinux (BIOS) and systemd-boot (UEFI); partition 2 = the ext4 root,
# made from the tree with mkfs.ext4 -d (no loop device, no mount).
set -euo pipefail
shopt -s nullglob

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}
SUITE=bookworm
ARCH=amd64
NAME=$SUITE-$ARCH

# What debootstrap adds to minbase. cloud-init's own dependencies (python3,
# isc-dhcp-client, ...) follow; Recommends do not.
# python3-cffi-backend: debootstrap does not resolve the virtual packages
# python3-cryptography depends on (python3-cffi-backend-api-*).
INCLUDE=(linux-image-cloud-amd64 initramfs-tools systemd-sysv udev dbus
	cloud-init qemu-guest-agent iproute2 python3-cffi-backend)
# The UEFI loader, taken from its .deb (not installed in the guest).
SDBOOT_PACKAGE=systemd-boot-efi

# The initramfs only needs to find the root disk: the agent's buses.
INITRAMFS_MODULES=(virtio_pci virtio_blk virtio_scsi sd_mod nvme ext4)

ROOT_LABEL=otx-root
# Kernel command line, for both boot loaders: quiet, no status lines, no
# speculative-execution mitigations (TCG pays dearly for them).
cmdline() {
	echo "root=LABEL=$ROOT_LABEL rw console=ttyS0 quiet loglevel=3 mitigations=off systemd.show_status=false"
}

log() { printf 'debian-build: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

case ${1:-} in
"") ;;
-h | --help)
	sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
	exit 0
	;;
*) die "unknown argument: $1 (usage: build.sh)" ;;
esac

# --- host tools --------------------------------------------------------------

host_tools() {
	cat <<-EOF
		apt-get apt
		debootstrap debootstrap
		dpkg-deb dpkg
		flock util-linux
		sha256sum coreutils
		mkfs.ext4 e2fsprogs
		mkfs.fat dosfstools
		mcopy mtools
		syslinux syslinux
		/usr/lib/syslinux/mbr/mbr.bin syslinux-common
		qemu-img qemu-utils
	EOF
}

APT_UPDATED=0
apt_update_once() {
	[[ $APT_UPDATED == 0 ]] || return 0
	log "apt-get update"
	apt-get update -qq >&2 || log "apt-get update failed"
	APT_UPDATED=1
}

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

# --- inputs ------------------------------------------------------------------

# The Debian archive serving $SUITE in the host's apt sources (one-line and
# deb822 formats), else deb.debian.org.
mirror() {
	if [[ -n ${OTHERIX_DEBIAN_MIRROR:-} ]]; then
		echo "$OTHERIX_DEBIAN_MIRROR"
		return
	fi
	local f m
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[[ -r $f ]] || continue
		m=$(awk -v s="$SUITE" '
			/^deb[ \t]/ { u = ""; for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if (u == "") u = $i; else if ($i == s) { print u; exit } else break } }
			/^URIs:/ { uris = $2 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s && uris != "") { print uris; exit } }
			/^$/ { uris = "" }
		' "$f")
		if [[ -n $m && $m != *security* ]]; then
			echo "${m%/}"
			return
		fi
	done
	echo "http://deb.debian.org/debian"
}

# Versions of the named packages in $SUITE/main of the host's apt lists
# (what debootstrap installs, as of the last apt-get update): when one
# moves (a new kernel, a cloud-init fix), the key moves and the image is
# rebuilt. build-info.txt lists what was installed.
# Remembered in $CACHE/debian/.versions-$NAME until apt's lists change,
# since apt-cache takes seconds on a busy machine.
versions() {
	local memo=$CACHE/debian/.versions-$NAME lists=/var/lib/apt/lists want out p v
	eval "$(apt-config shell lists Dir::State::lists/d 2>/dev/null)"
	want="v1 $SUITE ${INCLUDE[*]} $SDBOOT_PACKAGE"
	if [[ -f $memo && $memo -nt $lists && "$(head -n 1 "$memo")" == "$want" ]]; then
		tail -n +2 "$memo"
		return 0
	fi
	out=$(apt-cache madison "${INCLUDE[@]}" "$SDBOOT_PACKAGE" 2>/dev/null) || return 1
	for p in "${INCLUDE[@]}" "$SDBOOT_PACKAGE"; do
		v=$(awk -F' [|] ' -v p="$p" -v s=" $SUITE/main " '
			{ gsub(/ /, "", $1); gsub(/ /, "", $2) }
			$1 == p && index($3, s) { print $2; exit }' <<<"$out")
		[[ -n $v ]] || {
			rm -f "$memo.$$"
			return 1
		}
		echo "$p $v"
	done >"$memo.$$"
	{ echo "$want"; cat "$memo.$$"; } >"$memo.$$.new" && mv -f "$memo.$$.new" "$memo"
	cat "$memo.$$"
	rm -f "$memo.$$"
}

image_key() {
	{
		(cd "$HERE" && find . -type f ! -name "*.md" -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
		echo "suite $SUITE arch $ARCH"
		echo "$VERSIONS"
	} | sha256sum | cut -c1-16
}

# --- root file system ----------------------------------------------------------

# bootstrap ROOT: debootstrap in two stages, so that dpkg in the second
# runs with force-unsafe-io (no fsync per file: minutes on a busy machine)
# and with rootfs/ (cloud-init's settings, the initramfs module list)
# already in place; then the units.
bootstrap() {
	local root=$1 debs=$CACHE/debs/debian-$NAME
	mkdir -p "$debs"
	local inc
	inc=$(
		IFS=,
		echo "${INCLUDE[*]}"
	)
	log "debootstrap $SUITE from $MIRROR"
	debootstrap --foreign --variant=minbase --arch="$ARCH" --include="$inc" \
		--cache-dir="$debs" "$SUITE" "$root" "$MIRROR" >&2 ||
		die "debootstrap (first stage) failed (see above; mirror $MIRROR)"

	cp -a "$HERE/rootfs/." "$root/"
	chmod 0755 "$root/usr/local/sbin/otherix-report"
	printf '%s\n' "${INITRAMFS_MODULES[@]}" >"$root/etc/initramfs-tools/modules"
	mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
	echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/otherix-build"
	log "debootstrap --second-stage"
	if ! chroot "$root" /debootstrap/debootstrap --second-stage >&2; then
		umount_below "$root"
		tail -n 30 "$root/debootstrap/debootstrap.log" >&2 || true
		die "debootstrap (second stage) failed"
	fi
	# It mounts /proc and /sys in the tree and may leave them.
	umount_below "$root"
	rm -f "$root/etc/dpkg/dpkg.cfg.d/otherix-build"

	# The hostname is cloud-init's to set; debootstrap copied the host's.
	echo localhost >"$root/etc/hostname"
	printf 'LABEL=%s / ext4 rw,discard,errors=remount-ro 0 1\n' "$ROOT_LABEL" >"$root/etc/fstab"
	: >"$root/etc/machine-id" # first boot makes one
	rm -f "$root/var/lib/dbus/machine-id"

	in_root "$root" systemctl enable -q systemd-networkd.service otherix-report.service
	# Not needed by a test guest, and each costs boot time under TCG: the
	# gettys (the serial console carries the report), timers that start
	# apt or e2scrub.
	in_root "$root" systemctl mask -q serial-getty@ttyS0.service getty@tty1.service \
		apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer

	# No docs, man pages, locales or apt lists in the image.
	rm -rf "$root"/usr/share/{doc,man,info,lintian,linda}/* "$root"/var/cache/apt/archives/*.deb \
		"$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
		"$root"/var/log/*.log "$root"/debootstrap
	find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
}

# in_root ROOT CMD...: CMD in the tree, with /proc, /sys and /dev for it.
in_root() {
	local root=$1
	shift
	mount -t proc proc "$root/proc"
	mount -t sysfs sysfs "$root/sys"
	mount --bind /dev "$root/dev"
	local rc=0
	chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@" || rc=$?
	umount_below "$root"
	return $rc
}

# umount_below PATH: unmounts everything mounted under PATH, deepest first.
umount_below() {
	local m
	for m in $(awk -v p="$1/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | LC_ALL=C sort -r); do
		umount -l "$m"
	done
}

# --- disk ----------------------------------------------------------------------

PART1_START=2048     # sectors: the FAT at 1 MiB
PART1_SECTORS=65536  # 32 MiB
PART2_START=$((PART1_START + PART1_SECTORS))

# build_boot WORK ROOT: $WORK/boot.img, the FAT with both loaders.
build_boot() {
	local work=$1 root=$2 esp=$1/esp kver
	local k=("$root"/boot/vmlinuz-*)
	[[ ${#k[@]} -eq 1 ]] || die "expected one kernel in the tree, found ${#k[@]}"
	kver=${k[0]##*/vmlinuz-}
	KVER=$kver
	mkdir -p "$esp/EFI/BOOT" "$esp/loader/entries"
	cp "$root/boot/vmlinuz-$kver" "$esp/vmlinuz"
	cp "$root/boot/initrd.img-$kver" "$esp/initrd.img"
	cat >"$esp/syslinux.cfg" <<-EOF
		DEFAULT debian
		PROMPT 0
		TIMEOUT 0
		LABEL debian
		  KERNEL /vmlinuz
		  INITRD /initrd.img
		  APPEND $(cmdline)
	EOF
	dpkg-deb -x "$SDBOOT_DEB" "$work/sdboot"
	cp "$work/sdboot/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$esp/EFI/BOOT/BOOTX64.EFI"
	printf 'default debian.conf\ntimeout 0\neditor no\n' >"$esp/loader/loader.conf"
	cat >"$esp/loader/entries/debian.conf" <<-EOF
		title Debian $SUITE (otherix test)
		linux /vmlinuz
		initrd /initrd.img
		options $(cmdline)
	EOF
	mkfs.fat -F 16 -n OTX-BOOT -i 4f545844 -h "$PART1_START" -C "$work/boot.img" $((PART1_SECTORS / 2)) >/dev/null
	(cd "$esp" && mcopy -i "$work/boot.img" -s -p -Q -m ./* ::/)
	syslinux --install "$work/boot.img"
	# The kernel and initramfs are read from the FAT: not twice in the image.
	rm -f "$root"/boot/vmlinuz-* "$root"/boot/initrd.img-* "$root"/boot/System.map-*
}

# build_root WORK ROOT: $WORK/root.img, the ext4 made from the tree, its
# size the tree's plus a third (the guest writes logs, cloud-init state).
build_root() {
	local work=$1 root=$2 mib
	mib=$(du -s -m -x "$root" | cut -f1)
	mib=$((mib * 4 / 3 + 128))
	mkfs.ext4 -q -L "$ROOT_LABEL" -U 4f545844-0000-4000-8000-000000000002 -E root_owner=0:0 \
		-O ^metadata_csum_seed -d "$root" "$work/root.img" "${mib}M" ||
		die "mkfs.ext4 -d failed"
}

le32() { # value → printf escapes of its 4 little-endian bytes
	printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) \
		$((($1 >> 16) & 255)) $((($1 >> 24) & 255))
}

# build_disk WORK OUT: OUT/debian.raw; partition 1 (FAT16 LBA, active) and
# partition 2 (Linux), syslinux's MBR boot code in front.
build_disk() {
	local work=$1 raw=$2/debian.raw sectors2 e
	sectors2=$(($(stat -c %s "$work/root.img") / 512))
	truncate -s $(((PART2_START + sectors2) * 512)) "$raw"
	dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
	e="$(le32 0x4f545844)\\x00\\x00"
	e+="\\x80\\xfe\\xff\\xff\\x0e\\xfe\\xff\\xff$(le32 $PART1_START)$(le32 $PART1_SECTORS)"
	e+="\\x00\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff$(le32 $PART2_START)$(le32 "$sectors2")"
	# shellcheck disable=SC2059 # the format is built from escapes on purpose
	printf "$e" | dd of="$raw" bs=1 seek=440 conv=notrunc status=none
	printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none
	dd if="$work/boot.img" of="$raw" bs=512 seek=$PART1_START conv=notrunc status=none
	dd if="$work/root.img" of="$raw" bs=1M seek=$((PART2_START / 2048)) conv=notrunc,sparse status=none
}

fetch_sdboot() {
	local dir=$CACHE/debs/debian-$NAME/loader f
	mkdir -p "$dir"
	rm -f "$dir"/*.deb
	(cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$SDBOOT_PACKAGE" >&2) ||
		die "cannot download $SDBOOT_PACKAGE"
	f=("$dir"/"$SDBOOT_PACKAGE"_*.deb)
	[[ ${#f[@]} -eq 1 ]] || die "no $SDBOOT_PACKAGE .deb after apt-get download"
	SDBOOT_DEB=${f[0]}
}

write_build_info() {
	local root=$1 out=$2
	{
		echo "suite: $SUITE"
		echo "arch: $ARCH"
		echo "key: $KEY"
		echo "mirror: $MIRROR"
		echo "kernel: $KVER"
		echo "cmdline: $(cmdline)"
		echo "packages: $(chroot "$root" dpkg-query -W -f '${Package}\n' | wc -l)"
		echo "$VERSIONS" | sed 's/^/version: /'
		echo "root: $(du -s -m -x "$root" | cut -f1) MiB"
		echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
		echo "build_seconds: $((SECONDS - T0))"
		(cd "$out" && sha256sum debian.qcow2)
	} >"$out/build-info.txt"
}

build() {
	local work root out
	work=$(mktemp -d "$CACHE/debian/.tmp-$NAME-XXXXXX")
	# shellcheck disable=SC2064 # expand now: work is local
	trap "umount_below '$work'; rm -rf '$work'" EXIT
	root=$work/root
	fetch_sdboot
	bootstrap "$root"
	build_boot "$work" "$root"
	build_root "$work" "$root"
	out=$work/out
	mkdir -p "$out"
	build_disk "$work" "$out"
	qemu-img convert -f raw -O qcow2 "$out/debian.raw" "$out/debian.qcow2"
	rm -f "$out/debian.raw"
	write_build_info "$root" "$out"
	chmod 0444 "$out"/*
	chmod 0755 "$out"
	mv -T "$out" "$IMAGE_DIR"
	rm -rf "$work"
	trap - EXIT
}

# Images unused for a day go (each is a few hundred MiB).
prune() {
	find "$CACHE/debian" -mindepth 1 -maxdepth 1 -name "$NAME-*" -type d \
		! -path "$IMAGE_DIR" -mtime +0 -exec rm -rf {} + 2>/dev/null || true
}

main() {
	T0=$SECONDS
	mkdir -p "$CACHE/debian"

	# Fast path, without the lock: the image is already there.
	if [[ -z $(missing_tools) ]] && VERSIONS=$(versions); then
		KEY=$(image_key)
		IMAGE_DIR=$CACHE/debian/$NAME-$KEY
		if [[ -f $IMAGE_DIR/debian.qcow2 ]]; then
			touch "$IMAGE_DIR"
			echo "$IMAGE_DIR"
			return 0
		fi
	fi

	exec 9>"$CACHE/debian/.lock-$NAME"
	flock 9
	# Under the lock, a temporary folder is what a killed build left.
	local stale
	for stale in "$CACHE/debian/.tmp-$NAME-"*; do
		umount_below "$stale"
		rm -rf "$stale"
	done
	ensure_tools
	if ! VERSIONS=$(versions); then
		apt_update_once
		VERSIONS=$(versions) || die "apt knows no candidate for one of: ${INCLUDE[*]} $SDBOOT_PACKAGE"
	fi
	KEY=$(image_key)
	IMAGE_DIR=$CACHE/debian/$NAME-$KEY
	if [[ ! -f $IMAGE_DIR/debian.qcow2 ]]; then
		MIRROR=$(mirror)
		log "building $IMAGE_DIR"
		build
		log "built in $((SECONDS - T0)) s"
		prune
	fi
	echo "$IMAGE_DIR"
}

main
