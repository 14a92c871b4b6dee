package firmware

import "strings"

// Block node names of Args. The engine's own nodes are disk<n> and cd<n>.
const (
	CodeNode = "fw-code"
	VarsNode = "fw-vars"
)

// MachineOpts returns what to append to the engine's "-machine
// q35,accel=…": ",smm=on" for firmware that requires SMM (secure-boot
// OVMF), else "".
func (e *Entry) MachineOpts() string {
	if e.RequiresSMM {
		return ",smm=on"
	}
	return ""
}

// Globals returns the -global arguments the firmware needs: for SMM
// firmware, a pflash only SMM code may write (without it secure-boot OVMF
// hangs with no output at all).
func (e *Entry) Globals() []string {
	if e.RequiresSMM {
		return []string{"-global", "driver=cfi.pflash01,property=secure,value=on"}
	}
	return nil
}

// Args returns the arguments that give the guest this firmware; varsPath
// is the VM's own variable store (PrepareVars). For bios there are none
// (QEMU loads SeaBIOS by itself) and varsPath is ignored. For UEFI:
//
//	-blockdev driver=file,node-name=fw-code-file,filename=<Code>,read-only=on
//	-blockdev driver=raw,node-name=fw-code,file=fw-code-file,read-only=on
//	-blockdev driver=file,node-name=fw-vars-file,filename=<varsPath>
//	-blockdev driver=raw,node-name=fw-vars,file=fw-vars-file
//	-machine pflash0=fw-code,pflash1=fw-vars
//
// (driver= is the descriptor's format), and on arm64
// "-boot menu=on,splash-time=0": AAVMF otherwise waits about 5 s for a key.
//
// The flash is given as -blockdev nodes bound to the machine's pflash0 and
// pflash1 properties rather than "-drive if=pflash", the legacy option
// that cannot be mixed cleanly with the engine's -blockdev disks. QEMU 7.2
// merges this second -machine with the engine's "-machine q35,accel=…"
// (and virt has the same two properties).
func (e *Entry) Args(varsPath string) []string {
	return e.FlashArgs(e.Code, varsPath)
}

// FlashArgs is Args with both flash files named by the caller, as QEMU is
// to open them: for a QEMU that opens nothing by path, /dev/fdset/N of a
// descriptor set holding e.Code opened read-only (code) and one holding
// the VM's variable store opened read-write (vars).
func (e *Entry) FlashArgs(code, vars string) []string {
	if e.Interface != "uefi" {
		return nil
	}
	a := []string{
		"-blockdev", "driver=file,node-name=" + CodeNode + "-file,filename=" + escapeOpt(code) + ",read-only=on",
		"-blockdev", "driver=" + e.CodeFormat + ",node-name=" + CodeNode + ",file=" + CodeNode + "-file,read-only=on",
		"-blockdev", "driver=file,node-name=" + VarsNode + "-file,filename=" + escapeOpt(vars),
		"-blockdev", "driver=" + e.VarsFormat + ",node-name=" + VarsNode + ",file=" + VarsNode + "-file",
		"-machine", "pflash0=" + CodeNode + ",pflash1=" + VarsNode,
	}
	if e.Arch == "arm64" {
		a = append(a, "-boot", "menu=on,splash-time=0")
	}
	return a
}

// escapeOpt escapes a value for QEMU's option syntax: a comma is doubled.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }
