#!/bin/sh
# /etc/otherix/platform.sh in the platform guest (build-platform.sh): /init
# runs it right after the "booted" marker, on the console. It prints
#
#   OTHERIX-GUEST firmware uefi secureboot=<0|1> lockdown=<none|integrity|confidentiality|unknown>
#   OTHERIX-GUEST firmware bios
#   OTHERIX-GUEST tpm present=0
#   OTHERIX-GUEST tpm present=1 getrandom=<ok|fail>
#
# It must return: /init goes on with the disks and the seed after it.

M="/lib/modules/$(uname -r)"
# /etc/otherix/platform-modules: modules for this script (efivarfs, tpm_tis), each
# after its dependencies, one per line with its parameters.
while read -r mod args; do
	[ -n "$mod" ] || continue
	# shellcheck disable=SC2086 # args are word-split on purpose
	insmod "$M/$mod" $args 2>/dev/null || echo "otherix-guest: insmod $mod failed"
done </etc/otherix/platform-modules

# --- firmware --------------------------------------------------------------------
if [ -d /sys/firmware/efi ]; then
	mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
	# An efivarfs file is 4 bytes of attributes, then the value: one byte.
	sb=$(dd if=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c \
		bs=1 skip=4 count=1 2>/dev/null | od -An -tu1 | tr -d ' \n')
	mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
	# "none [integrity] confidentiality": the bracketed word is in force.
	lockdown=$(sed -n 's/.*\[\([a-z]*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null)
	echo "OTHERIX-GUEST firmware uefi secureboot=${sb:-0} lockdown=${lockdown:-unknown}"
else
	echo "OTHERIX-GUEST firmware bios"
fi

# --- TPM ---------------------------------------------------------------------------
if [ -c /dev/tpm0 ]; then
	if /etc/otherix/tpm2 getrandom 8 >/dev/null 2>&1; then
		echo "OTHERIX-GUEST tpm present=1 getrandom=ok"
	else
		echo "OTHERIX-GUEST tpm present=1 getrandom=fail"
	fi
else
	echo "OTHERIX-GUEST tpm present=0"
fi
