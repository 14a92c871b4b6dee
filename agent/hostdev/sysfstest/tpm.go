package sysfstest

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"
)

// BackTPM puts a working TPM 2.0 behind the tree's /dev/tpm<n> (AddTPM
// first): swtpm in character-device mode on the master side of a new
// pseudo-terminal, whose slave, in raw mode, is bind-mounted on the node.
// Whoever opens the node talks to a TPM through a real character device,
// as to a host's /dev/tpm0; each command and response passes in one piece.
// A copy of the slave made with mknod would not do: the kernel opens a pty
// slave only through its devpts inode. Needs root (the bind mount) and
// swtpm; everything is undone at the test's end.
func (t *Tree) BackTPM(n int) {
	t.tb.Helper()
	tb := t.tb
	node := t.D(fmt.Sprintf("tpm%d", n))
	swtpm, err := exec.LookPath("swtpm")
	if err != nil {
		tb.Fatal("sysfstest: swtpm is missing (scripts/deps.sh installs it)")
	}
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer master.Close() // swtpm has its copy
	fd := int(master.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		tb.Fatal(err)
	}
	pn, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		tb.Fatal(err)
	}
	slave, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", pn), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	// Raw mode (cfmakeraw): bytes pass untouched.
	tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil {
		tb.Fatal(err)
	}
	tio.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	tio.Oflag &^= unix.OPOST
	tio.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	tio.Cflag &^= unix.CSIZE | unix.PARENB
	tio.Cflag |= unix.CS8
	tio.Cc[unix.VMIN], tio.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(int(slave.Fd()), unix.TCSETS, tio); err != nil {
		tb.Fatal(err)
	}
	os.Remove(node)
	if err := os.WriteFile(node, nil, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := unix.Mount(slave.Name(), node, "", unix.MS_BIND, ""); err != nil {
		tb.Fatal(err)
	}
	sw := exec.Command(swtpm, "chardev", "--tpm2", "--fd", "3", "--tpmstate", "dir="+tb.TempDir(), "--flags", "not-need-init,startup-clear")
	sw.ExtraFiles = []*os.File{master}
	if err := sw.Start(); err != nil {
		unix.Unmount(node, unix.MNT_DETACH)
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		unix.Unmount(node, unix.MNT_DETACH)
		sw.Process.Kill()
		sw.Wait()
		slave.Close() // held until now: a pty whose slave is closed hangs up
	})
}
