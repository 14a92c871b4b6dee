package systemd_test

import (
	"fmt"

	"github.com/otherix/otherix-agent/systemd"
)

// QEMU gets an explicit, minimal environment: never the agent's
// NOTIFY_SOCKET, watchdog or socket-activation variables.
func ExampleChildEnv() {
	for _, kv := range systemd.ChildEnv("NOTIFY_SOCKET=/run/systemd/notify", "QEMU_AUDIO_DRV=none") {
		fmt.Println(kv)
	}
	// Output:
	// PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	// LANG=C
	// QEMU_AUDIO_DRV=none
}

// The STATUS= line shown by `systemctl status otherix-agent`.
func ExampleStatusInfo() {
	fmt.Println(systemd.StatusInfo{VMsRunning: 2, VMsTotal: 3, ControlPlane: false, LastError: "disk_full: pool p1"})
	// Output:
	// 2/3 VMs running; control plane disconnected; last error: disk_full: pool p1
}

func ExampleScopeName() {
	fmt.Println(systemd.ScopeName("5f3a9c1e"))
	// Output:
	// otherix-vm-5f3a9c1e.scope
}
