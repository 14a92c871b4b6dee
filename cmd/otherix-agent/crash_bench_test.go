package main

import (
	"os/exec"
	"sort"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/api"
)

// BenchmarkCrashDetection: how long after a kill -9 of a VM's QEMU the
// standalone API shows the VM crashed (polled every millisecond), beside
// a baseline measured in the same run: the kernel's own notice of the
// same kind of death, a bare qemu-system-x86_64 (same machine, memory and
// accelerator) killed with SIGKILL and seen exiting through its pidfd.
// The difference is the agent's cost: reaping, recording the exit,
// persisting and serving it. It also reports how long the restart policy
// took to have the VM running again (a new QEMU answering QMP).
//
//	go test -run '^$' -bench CrashDetection -benchtime 10x ./cmd/otherix-agent
func BenchmarkCrashDetection(b *testing.B) {
	b.Run("baseline-kernel-pidfd", func(b *testing.B) {
		var lat []time.Duration
		for i := 0; i < b.N; i++ {
			cmd := exec.Command("qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256", "-smp", "1",
				"-display", "none", "-nodefaults", "-S")
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			fd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
			if err != nil {
				b.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond) // let it map its memory
			start := time.Now()
			syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			for {
				if n, err := unix.Poll(fds, -1); n > 0 || (err != nil && err != unix.EINTR) {
					break
				}
			}
			lat = append(lat, time.Since(start))
			unix.Close(fd)
			cmd.Wait()
		}
		report(b, lat, "ms/crash-seen")
	})
	b.Run("agent-api", func(b *testing.B) {
		a := startAgentSocket(b, nil, "restart:\n  backoff_base: 10ms\n  backoff_max: 10ms\n  crash_loop_count: 1000\n", false)
		a.ok("vm", "create", "crashy", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--no-cloud-init", "--wait")
		var seen, restarted []time.Duration
		for i := 0; i < b.N; i++ {
			v := a.waitVM("crashy", "running", 60*time.Second, func(v api.VM) bool { return v.Status == api.StatusRunning && v.QEMUPID != 0 })
			time.Sleep(300 * time.Millisecond)
			start := time.Now()
			syscall.Kill(v.QEMUPID, syscall.SIGKILL)
			for {
				var got api.VM
				if err := a.apiGet("/v1/vms/crashy", &got); err == nil && got.Status == api.StatusCrashed {
					break
				}
				time.Sleep(time.Millisecond)
			}
			seen = append(seen, time.Since(start))
			a.waitVM("crashy", "restarted", 60*time.Second, func(n api.VM) bool { return n.Status == api.StatusRunning && n.QEMUPID != v.QEMUPID })
			restarted = append(restarted, time.Since(start))
		}
		report(b, seen, "ms/crash-seen")
		report(b, restarted, "ms/restarted")
	})
}

// report prints a latency's median and maximum as benchmark metrics.
func report(b *testing.B, lat []time.Duration, unit string) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(lat[len(lat)/2]), "median-"+unit)
	b.ReportMetric(ms(lat[len(lat)-1]), "max-"+unit)
	b.ReportMetric(0, "ns/op")
}
