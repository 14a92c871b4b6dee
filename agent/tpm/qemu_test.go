package tpm

import (
	"context"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
)

// These tests run real QEMU (TCG) against real swtpm, and boot the real
// platform guest, whose /etc/otherix/tpm2 speaks raw TPM 2.0 to /dev/tpm0.

const bootTimeout = 3 * time.Minute // TCG on a busy 2-core machine

func needQEMU(t *testing.T) {
	t.Helper()
	needSWTPM(t)
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatalf("qemu-system-x86_64 is missing: %v", err)
	}
}

// waitDone waits for swtpm's exit.
func waitDone(t *testing.T, p *Process, why string) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("swtpm %d still runs %s", p.PID(), why)
	}
	if alive(p.PID()) {
		t.Fatalf("swtpm %d is alive after Done", p.PID())
	}
}

// TestSWTPMFollowsQEMU: QEMU (paused, no guest) connects to swtpm at
// start; swtpm exits when QEMU quits and when QEMU is SIGKILLed; a swtpm
// killed under a running QEMU is seen through Done while QEMU lives on.
func TestSWTPMFollowsQEMU(t *testing.T) {
	needQEMU(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, end := range []string{"quit", "sigkill-qemu", "sigkill-swtpm"} {
		t.Run(end, func(t *testing.T) {
			state, run := vmDirs(t)
			p := startSWTPM(t, Config{StateDir: state, RunDir: run})
			args, err := Args("amd64", p.Socket())
			if err != nil {
				t.Fatal(err)
			}
			m := testguest.StartMachine(t, testguest.MachineOptions{Dir: run, Args: append(args, "-S")})
			// QMP answers once QEMU is up, and so connected to swtpm.
			if err := m.QMP(ctx, "query-status"); err != nil {
				t.Fatal(err)
			}
			switch end {
			case "quit":
				if err := m.QMP(ctx, "quit"); err != nil {
					t.Fatal(err)
				}
				waitDone(t, p, "after QEMU quit")
			case "sigkill-qemu":
				m.Kill()
				waitDone(t, p, "after QEMU was SIGKILLed")
			case "sigkill-swtpm":
				p.kill()
				waitDone(t, p, "after SIGKILL")
				if err := m.QMP(ctx, "query-status"); err != nil {
					t.Errorf("QEMU after its swtpm died: %v", err)
				}
				select {
				case <-m.Exited():
					t.Error("QEMU exited with its swtpm")
				default:
				}
			}
		})
	}
}

// TestGuestTPMPersists boots the guest with a TPM: it sees /dev/tpm0,
// GetRandom works, it defines and writes an NV index; QEMU quits (swtpm
// with it); a new swtpm on the same state and a new QEMU: the guest reads
// the index back. Then QEMU is SIGKILLed and swtpm goes too.
func TestGuestTPMPersists(t *testing.T) {
	needQEMU(t)
	t.Parallel()
	base := testguest.QCOW2Arch(t, "amd64")
	state, run := vmDirs(t)
	disk := testguest.OverlayOf(t, base, t.TempDir())
	const index = "0x01500001"
	secret := "otherix-tpm-nv-1" // 16 bytes
	secretHex := hex.EncodeToString([]byte(secret))

	ctx, cancel := context.WithTimeout(context.Background(), 2*bootTimeout)
	defer cancel()
	// The first QEMU inherits its connection to swtpm (Connect, ArgsFD),
	// as the engine's unprivileged QEMU does; the second opens the socket.
	boot := func(name, userData string, inherit bool) (*testguest.Machine, *Process) {
		seed := testguest.SeedISO(t, filepath.Join(t.TempDir(), name), "instance-id: tpm-1\nlocal-hostname: tpm\n", userData)
		p := startSWTPM(t, Config{StateDir: state, RunDir: run})
		o := testguest.MachineOptions{Disk: disk, Seed: seed}
		var err error
		if inherit {
			conn, cerr := p.Connect(ctx)
			if cerr != nil {
				t.Fatal(cerr)
			}
			defer conn.Close()
			o.Files = []*os.File{conn}
			o.Args, err = ArgsFD("amd64", 4)
		} else {
			o.Args, err = Args("amd64", p.Socket())
		}
		if err != nil {
			t.Fatal(err)
		}
		return testguest.StartMachine(t, o), p
	}

	m, p := boot("seed1", "#cloud-config\n"+
		"#otherix-run: "+testguest.TPM2Tool+" nvdefine "+index+" 16\n"+
		"#otherix-run: "+testguest.TPM2Tool+" nvwrite "+index+" "+secretHex+"\n", true)
	m.Expect(ctx, t, testguest.Prefix+"booted ")
	if got, want := m.Expect(ctx, t, testguest.Prefix+"tpm "), testguest.Prefix+"tpm present=1 getrandom=ok"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	for _, step := range []struct{ kind, want string }{
		{"tpm2 nvdefine", "tpm2 nvdefine rc=00000000"},
		{"run-exit", "run-exit 1 0"},
		{"tpm2 nvwrite", "tpm2 nvwrite rc=00000000"},
		{"run-exit", "run-exit 2 0"},
	} {
		if got := m.Expect(ctx, t, testguest.Prefix+step.kind); got != testguest.Prefix+step.want {
			t.Fatalf("got %q, want %q", got, testguest.Prefix+step.want)
		}
	}
	if err := m.QMP(ctx, "quit"); err != nil {
		t.Fatal(err)
	}
	waitDone(t, p, "after QEMU quit")
	if err := p.Stop(ctx); err != nil { // removes the socket and pid file
		t.Fatal(err)
	}

	m, p = boot("seed2", "#cloud-config\n#otherix-run: "+testguest.TPM2Tool+" nvread "+index+" 16\n", false)
	want := testguest.Prefix + "tpm2 nvread rc=00000000 data=" + secretHex
	if got := m.Expect(ctx, t, testguest.Prefix+"tpm2 nvread"); got != want {
		t.Errorf("after a restart: got %q, want %q", got, want)
	}
	m.Kill()
	waitDone(t, p, "after QEMU was SIGKILLed")
}
