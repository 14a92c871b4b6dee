package testguest

import "strings"

// Prefix starts every marker line the guest prints.
const Prefix = "OTHERIX-GUEST "

// Marker is one parsed marker line: "OTHERIX-GUEST <Kind> <Value>".
// For "OTHERIX-GUEST tick 3" Kind is "tick" and Value "3"; for
// "OTHERIX-GUEST ready" Value is empty.
type Marker struct {
	Kind  string
	Value string
}

// ParseMarker parses a console line. The prefix may come after other bytes
// on the line (firmware escape codes); ok is false if there is no marker.
func ParseMarker(line string) (m Marker, ok bool) {
	i := strings.Index(line, Prefix)
	if i < 0 {
		return Marker{}, false
	}
	rest := strings.TrimRight(line[i+len(Prefix):], "\r\n")
	kind, value, _ := strings.Cut(rest, " ")
	if kind == "" {
		return Marker{}, false
	}
	return Marker{Kind: kind, Value: value}, true
}

// ParseMarkers returns the markers of text by kind, each kind's values in
// the order printed: for a boot, m["cidata"] is ["label=cidata dev=sr0",
// "files=meta-data,user-data", "instance-id=…", …] and m["tick"] is
// ["1", "2", …].
func ParseMarkers(text string) map[string][]string {
	out := map[string][]string{}
	for _, line := range strings.Split(text, "\n") {
		if m, ok := ParseMarker(line); ok {
			out[m.Kind] = append(out[m.Kind], m.Value)
		}
	}
	return out
}

// Fields parses "key=value key2=value2" (the booted and cidata markers)
// into a map; words without "=" are ignored.
func Fields(value string) map[string]string {
	out := map[string]string{}
	for _, w := range strings.Fields(value) {
		if k, v, ok := strings.Cut(w, "="); ok {
			out[k] = v
		}
	}
	return out
}

// RebootOnce is an "#otherix-run:" command that reboots the guest from
// inside, on its first boot only: reboot -f has the kernel reset the
// machine, and QEMU goes on. Before it the guest prints "OTHERIX-GUEST
// rebooting itself" and marks its boot disk /dev/vda (8 bytes at offset
// 51200, in the unused gap between the MBR and the partition at 1 MiB); a
// later boot finds the mark, stays up and prints "OTHERIX-GUEST run-exit
// N 0" for it (N: its line among the #otherix-run: lines).
const RebootOnce = `[ "$(dd if=/dev/vda bs=1 skip=51200 count=8 2>/dev/null)" = rebooted ] || ` +
	`{ printf rebooted | dd of=/dev/vda bs=1 seek=51200 conv=notrunc,fsync 2>/dev/null && echo "OTHERIX-GUEST rebooting itself" && reboot -f; }`

// PanicViaDevice is an "#otherix-run:" command that does from userspace
// what Linux's pvpanic driver does when the kernel panics, for guests whose
// kernel lacks the driver (no Debian arm64 kernel has CONFIG_PVPANIC). It
// finds the pvpanic-pci device (vendor 0x1b36, device 0x0011) in sysfs,
// unbinds its driver if one holds it (amd64), enables the device (memory
// decoding), reads the events the device supports from its BAR0 (the
// driver's probe) and writes PVPANIC_PANICKED (1, one byte) there with
// busybox devmem (the driver's panic notifier). QEMU then reports
// GUEST_PANICKED. Before the write the guest prints "OTHERIX-GUEST pvpanic
// bar0=<address> events=<hex>"; without the device it prints
// "OTHERIX-GUEST pvpanic none" and the command exits 1.
const PanicViaDevice = `d=; for p in /sys/bus/pci/devices/*; do ` +
	`[ "$(cat $p/vendor):$(cat $p/device)" = 0x1b36:0x0011 ] && d=$p && break; done; ` +
	`[ -n "$d" ] || { echo "OTHERIX-GUEST pvpanic none"; exit 1; }; ` +
	`[ -e $d/driver ] && echo ${d##*/} >$d/driver/unbind; echo 1 >$d/enable && ` +
	`set -- $(head -n 1 $d/resource) && ev=$(devmem $1 8) && ` +
	`echo "OTHERIX-GUEST pvpanic bar0=$1 events=$ev" && [ $(($ev & 1)) = 1 ] && devmem $1 8 1`
