package vnc_test

import (
	"fmt"

	"github.com/otherix/otherix-agent/agent/vnc"
)

// The options of a console on port 5903 of loopback: display 3, password
// authentication on, no password until vnc.SetPassword.
func ExampleArgs() {
	display, _ := vnc.DisplayArgs("amd64", 1)
	console, _ := vnc.Args("127.0.0.1", 5903)
	fmt.Println(display, console)
	fmt.Println(vnc.Validate(true, nil, "longer-than-8"))
	// Output:
	// [-device VGA,id=video0,bus=pcie.0,addr=0x1] [-vnc 127.0.0.1:3,password=on]
	// validation_failed: vnc_password is 13 bytes long: VNC authentication (DES) uses at most 8, and QEMU would silently ignore the rest
}
