package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/qmp"
)

// startTwinQEMU starts, with no agent around it, the QEMU the agent
// would start for its VM uuid (the same vm.BuildArgs over the VM's spec
// from its vm.json: machine, devices, firmware, sandbox, base image and
// seed), run as the same uid and booting the same guest, each writable
// disk an overlay of its own. It returns a QMP client to it once its
// guest is up: the benchmark's second baseline, what the same QMP command
// costs a VM like the agent's, so that the agent's own overhead can be
// told from QEMU's cost for a VM's devices.
func startTwinQEMU(tb testing.TB, dataDir, uuid string) *qmp.Client {
	tb.Helper()
	raw, err := os.ReadFile(filepath.Join(dataDir, "vms", uuid, "vm.json"))
	if err != nil {
		tb.Fatal(err)
	}
	var st struct {
		Spec vm.Spec `json:"spec"`
		UID  uint32  `json:"uid"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		tb.Fatal(err)
	}
	dir, err := os.MkdirTemp("/tmp", "oxt")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	spec := st.Spec
	spec.Name = "twin"
	spec.Disks = append([]vm.Disk(nil), spec.Disks...)
	for i, d := range spec.Disks {
		if d.ReadOnly {
			continue
		}
		info, err := exec.Command("qemu-img", "info", "-U", "--output=json", d.Path).Output()
		var img struct {
			Size int64 `json:"virtual-size"`
		}
		if err != nil || json.Unmarshal(info, &img) != nil || img.Size == 0 {
			tb.Fatalf("twin: size of %s: %v %s", d.Path, err, info)
		}
		overlay := filepath.Join(dir, fmt.Sprintf("disk%d.%s", i, d.Format))
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", d.Format, overlay, fmt.Sprint(img.Size)).CombinedOutput(); err != nil {
			tb.Fatalf("twin: disk %d: %v %s", i, err, out)
		}
		spec.Disks[i].Path = overlay
	}
	paths := vm.Paths{QMPSocket: filepath.Join(dir, "qmp.sock"), QGASocket: filepath.Join(dir, "qga.sock"), ConsoleLog: filepath.Join(dir, "console.log")}
	args, specs, err := vm.BuildArgs(&spec, paths, vm.Platform{Accel: "tcg"})
	if err != nil {
		tb.Fatal(err)
	}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, fs := range specs {
		var f *os.File
		switch fs.Kind {
		case vm.FileListen:
			f = testguest.ListenUnix(tb, fs.Path)
		case vm.FileRead, vm.FileWrite, vm.FileAppend:
			f, err = os.OpenFile(fs.Path, fs.Kind.OpenFlags(), 0o600)
			if err != nil {
				tb.Fatal(err)
			}
		default:
			tb.Fatalf("twin: the benchmark's VM passes a file of kind %d", fs.Kind)
		}
		files = append(files, f)
	}
	c := runQEMU(tb, args, files, st.UID, paths.QMPSocket)
	waitConsole(tb, testguest.OpenConsole(paths.ConsoleLog), "OTHERIX-GUEST ready")
	return c
}

// runQEMU starts qemu-system-x86_64 with args, files as fds 3, 4, ...,
// as uid (0: the test's), killed with the test, and returns a QMP client
// on the socket at qmpPath.
func runQEMU(tb testing.TB, args []string, files []*os.File, uid uint32, qmpPath string) *qmp.Client {
	tb.Helper()
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.ExtraFiles = files
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uid, Gid: uid}
	}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, qmpPath)
	if err != nil {
		tb.Fatalf("QMP of %s: %v\n%s", args, err, stderr.String())
	}
	tb.Cleanup(func() { c.Close() })
	return c
}
