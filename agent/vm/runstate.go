package vm

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
)

// ErrorPolicy is every virtio-blk and virtio-scsi disk's I/O error policy
// (hot-plugged ones included). A write that fails because the host's file
// system is full (ENOSPC, EDQUOT) stops the guest: QEMU keeps the request,
// the VM shows paused with the reason ("io_error: no space left on
// device", with the disk), and `vm resume` retries it once space is
// freed, so the guest never sees an error it did not cause. Every other
// error, read or write, is reported to the guest as a disk error, as real
// hardware would: stopping for an error that does not go away would only
// hang the guest. NVMe disks have no policy in QEMU: the guest sees every
// error, a full pool included.
const ErrorPolicy = ",werror=enospc,rerror=report"

// RunState events passed to Config.OnRunState.
const (
	RunStatePaused  = "paused"   // QEMU paused the guest (an I/O error, a guest panic...)
	RunStateResumed = "resumed"  // the guest runs again
	RunStateIOError = "io_error" // a disk error was reported to the guest
	// RunStateGuestReboot: the guest rebooted itself (QMP RESET from the
	// guest); the same QEMU runs on.
	RunStateGuestReboot = "guest_reboot"
	ioErrorRateLimit    = 10 * time.Second
	// resetEchoWindow: a RESET from the guest this soon after another
	// RESET is an echo of that one, not a new reboot (see rebootFilter).
	resetEchoWindow = 2 * time.Second
)

// rebootFilter tells a guest's reboot from the resets that echo it. One
// reboot resets the machine more than once: Linux may try a second reset
// method before the first one took effect, and SeaBIOS, started again
// over the memory it left, finds it has run before and resets the machine
// once more (its resume path); it does so after a QMP system_reset too.
// Each is a RESET event with guest true, within milliseconds of the first
// (under 300 ms under TCG on a loaded host); a guest cannot boot and
// reboot again within resetEchoWindow.
type rebootFilter struct{ last time.Time }

// reset records a RESET event at t (guest: the guest caused it) and
// reports whether it is a new reboot by the guest.
func (f *rebootFilter) reset(t time.Time, guest bool) bool {
	echo := !f.last.IsZero() && t.Sub(f.last) < resetEchoWindow
	f.last = t
	return guest && !echo
}

// ioError is a disk request QEMU could not complete (BLOCK_IO_ERROR).
type ioError struct {
	node    string // the block node: disk0, hp1...
	op      string // read or write
	action  string // stop, report, ignore
	reason  string // QEMU's text (strerror)
	nospace bool
}

func parseIOError(data map[string]any) ioError {
	str := func(k string) string { s, _ := data[k].(string); return s }
	e := ioError{node: str("node-name"), op: str("operation"), action: str("action"), reason: str("reason")}
	e.nospace, _ = data["nospace"].(bool)
	if e.node == "" {
		e.node = str("device")
	}
	return e
}

// String is the VM's status reason for it.
func (e ioError) String() string {
	what := strings.ToLower(e.reason)
	if e.nospace {
		what = "no space left on device"
	}
	if what == "" {
		what = "i/o error"
	}
	return fmt.Sprintf("io_error: %s (%s, %s)", what, e.node, e.op)
}

// diskDesc names a disk node for a reason: its file where the spec knows
// it.
func diskDesc(s Spec, hot []HotDisk, node string) string {
	var i int
	if _, err := fmt.Sscanf(node, "disk%d", &i); err == nil && i >= 0 && i < len(s.Disks) && node == fmt.Sprintf("disk%d", i) {
		return "disk " + node + " " + s.Disks[i].Path
	}
	for _, h := range hot {
		if hotNode(h.Port) == node {
			return "disk " + node + " " + h.Path
		}
	}
	return "disk " + node
}

// onBlockIOError records a failed disk request. With action stop, QEMU
// pauses the guest next (STOP, status io-error): onStop gives the pause
// this reason. Errors reported to the guest are logged, at most one every
// ten seconds per VM.
func (p *process) onBlockIOError(data map[string]any) {
	e := parseIOError(data)
	m := p.m
	m.mu.Lock()
	e.node = diskDesc(m.st.Spec, m.st.Hot, e.node)
	m.mu.Unlock()
	p.mu.Lock()
	if e.action == "stop" {
		p.ioErr = e.String()
		p.mu.Unlock()
		return
	}
	now := time.Now()
	quiet := now.Sub(p.ioErrLogged) < ioErrorRateLimit
	if !quiet {
		p.ioErrLogged = now
	}
	p.mu.Unlock()
	if quiet {
		return
	}
	m.log.Warn("disk error reported to the guest", zap.String("reason", e.String()), zap.String("action", e.action))
	if f := m.e.cfg.OnRunState; f != nil {
		f(m.view(), RunStateIOError, e.String())
	}
}

// pauseReason maps QEMU's run state after a STOP to the reason of the
// pause; ok is false for states that are not a pause (shutting down,
// migrating).
func (p *process) pauseReason(status string) (reason string, ok bool) {
	switch status {
	case "paused":
		return "", true // the stop command: a pause op, or QMP by hand
	case "io-error":
		p.mu.Lock()
		defer p.mu.Unlock()
		r := p.ioErr
		p.ioErr = ""
		if r == "" {
			r = "io_error"
		}
		return r, true
	case "guest-panicked":
		return "guest panicked", true
	case "internal-error":
		return "qemu internal error", true
	case "watchdog":
		return "guest watchdog fired", true
	case "suspended":
		return "guest suspended", true
	}
	return "", false
}

// onStop follows a STOP event: QEMU paused the guest, on a pause op or on
// its own (a disk error with the stop policy). QEMU's run state says which.
func (p *process) onStop() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st struct {
		Status string `json:"status"`
	}
	if err := p.mon.Execute(ctx, "query-status", nil, &st); err != nil {
		return // QEMU is going away
	}
	reason, ok := p.pauseReason(st.Status)
	if !ok {
		return
	}
	if changed, _ := p.setQEMURunState("paused", reason); changed && reason != "" {
		m := p.m
		m.log.Warn("qemu paused the guest", zap.String("reason", reason))
		if f := m.e.cfg.OnRunState; f != nil {
			f(m.view(), RunStatePaused, reason)
		}
	}
}

// onResume follows a RESUME event. Only the end of a pause QEMU made on
// its own is a run-state event: a resume op's is the op's.
func (p *process) onResume() {
	if changed, was := p.setQEMURunState("running", ""); changed && was != "" {
		if f := p.m.e.cfg.OnRunState; f != nil {
			f(p.m.view(), RunStateResumed, "after "+was)
		}
	}
}

// setQEMURunState records a run state QEMU reported, for the current
// process of a VM that runs or is paused (never over stopping, starting).
// It reports whether the status or the reason changed, and the reason it
// had unless an op is in progress. Like setRunState, it is not persisted:
// re-adoption asks QEMU.
func (p *process) setQEMURunState(status, reason string) (changed bool, was string) {
	m := p.m
	m.mu.Lock()
	if m.proc != p || (m.st.Status != "running" && m.st.Status != "paused") ||
		(m.st.Status == status && m.st.Reason == reason) {
		m.mu.Unlock()
		return false, ""
	}
	if m.busy == "" { // else an op (pause, resume, stop) made the change
		was = m.st.Reason
	}
	m.st.Status, m.st.Reason = status, reason
	m.st.UpdatedAt = time.Now().UTC()
	v := m.viewLocked()
	m.mu.Unlock()
	m.notify(v)
	return true, was
}

// ioErrorReason asks QEMU which disk stopped a guest found paused on an
// I/O error (re-adoption: the BLOCK_IO_ERROR event is long gone).
func (m *machine) ioErrorReason(ctx context.Context, mon Monitor) string {
	var blocks []struct {
		Device   string `json:"device"`
		QDev     string `json:"qdev"`
		IOStatus string `json:"io-status"`
		Inserted *struct {
			NodeName string `json:"node-name"`
		} `json:"inserted"`
	}
	if err := mon.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return "io_error"
	}
	m.mu.Lock()
	spec, hot := m.st.Spec, m.st.Hot
	m.mu.Unlock()
	for _, b := range blocks {
		if b.IOStatus != "nospace" && b.IOStatus != "failed" {
			continue
		}
		node := b.Device
		if b.Inserted != nil && b.Inserted.NodeName != "" {
			node = b.Inserted.NodeName
		}
		e := ioError{node: diskDesc(spec, hot, node), op: "write", nospace: b.IOStatus == "nospace", reason: "i/o error"}
		return e.String()
	}
	return "io_error"
}
