package systemd

import (
	"strconv"
	"strings"
)

// StatusInfo is what the agent tells a human in `systemctl status`.
type StatusInfo struct {
	VMsRunning   int
	VMsTotal     int
	ControlPlane bool   // connected to the control plane
	LastError    string // short and free of secrets; "" when none
}

// String renders the STATUS= line, for example
// "2/3 VMs running; control plane connected; last error: disk_full: pool p1".
func (s StatusInfo) String() string {
	var b strings.Builder
	b.WriteString(strconv.Itoa(s.VMsRunning))
	b.WriteByte('/')
	b.WriteString(strconv.Itoa(s.VMsTotal))
	b.WriteString(" VMs running; control plane ")
	if s.ControlPlane {
		b.WriteString("connected")
	} else {
		b.WriteString("disconnected")
	}
	if s.LastError != "" {
		b.WriteString("; last error: ")
		b.WriteString(oneLine(s.LastError))
	}
	return b.String()
}
