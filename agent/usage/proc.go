package usage

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times: 100 on
// every Linux architecture the agent runs on (the kernel converts to it
// whatever its own HZ).
const clockTicks = 100

// procReader reads a process's CPU time and resident memory from /proc.
type procReader struct {
	root     string
	pageSize int64
}

func newProcReader(root string) procReader {
	return procReader{root: root, pageSize: int64(os.Getpagesize())}
}

// read returns the CPU time (user and system, every thread) in seconds
// and the resident set in bytes of pid.
func (p procReader) read(pid int) (cpu float64, rss int64, err error) {
	dir := filepath.Join(p.root, strconv.Itoa(pid))
	stat, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return 0, 0, err
	}
	cpu, err = parseStatCPU(stat)
	if err != nil {
		return 0, 0, fmt.Errorf("%s/stat: %w", dir, err)
	}
	statm, err := os.ReadFile(filepath.Join(dir, "statm"))
	if err != nil {
		return 0, 0, err
	}
	pages, err := parseStatmResident(statm)
	if err != nil {
		return 0, 0, fmt.Errorf("%s/statm: %w", dir, err)
	}
	return cpu, pages * p.pageSize, nil
}

// parseStatCPU returns utime+stime (fields 14 and 15 of proc(5)'s
// /proc/<pid>/stat) in seconds. The command name (field 2) may hold
// spaces and parentheses: fields are counted after its last ')'.
func parseStatCPU(b []byte) (float64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("no command name")
	}
	f := bytes.Fields(b[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("%d fields after the command name, want 13 or more", len(f))
	}
	utime, err := strconv.ParseUint(string(f[11]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("utime: %w", err)
	}
	stime, err := strconv.ParseUint(string(f[12]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stime: %w", err)
	}
	return float64(utime+stime) / clockTicks, nil
}

// parseStatmResident returns the resident pages (field 2 of statm).
func parseStatmResident(b []byte) (int64, error) {
	f := bytes.Fields(b)
	if len(f) < 2 {
		return 0, fmt.Errorf("%d fields, want 2 or more", len(f))
	}
	return strconv.ParseInt(string(f[1]), 10, 64)
}
