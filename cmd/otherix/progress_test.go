package main

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// ttyBuffer is a stderr that says whether it is a terminal.
type ttyBuffer struct {
	bytes.Buffer
	tty bool
}

func (b *ttyBuffer) IsTerminal() bool { return b.tty }

func TestFormatProgress(t *testing.T) {
	for _, tc := range []struct {
		p    api.Progress
		rate float64
		want string
	}{
		{api.Progress{Phase: "download", Done: 0, Total: 2 << 30}, -1, "download [------------------------]   0%  0 B / 2.0 GiB"},
		{api.Progress{Phase: "download", Done: 1 << 30, Total: 2 << 30}, 25 << 20, "download [############------------]  50%  1.0 GiB / 2.0 GiB  25.0 MiB/s"},
		{api.Progress{Phase: "download", Done: 1536, Total: 1536}, 0, "download [########################] 100%  1.5 KiB / 1.5 KiB  0 B/s"},
		{api.Progress{Phase: "download", Done: 3000, Total: 1000}, -1, "download [########################] 100%  1000 B / 1000 B"},
		{api.Progress{Phase: "download", Done: 5 << 20, Total: -1}, 1 << 20, "download 5.0 MiB  1.0 MiB/s"},
		{api.Progress{Done: 10, Total: 0}, -1, "progress 10 B"},
		{api.Progress{Phase: "boot", Done: 1, Total: 3}, -1, "boot [########----------------]  33%  1 B / 3 B"},
	} {
		if got := formatProgress(tc.p, tc.rate); got != tc.want {
			t.Errorf("formatProgress(%+v, %v) =\n%q, want\n%q", tc.p, tc.rate, got, tc.want)
		}
		if n := len(formatProgress(api.Progress{Phase: "download", Done: 999 << 30, Total: 1000 << 30}, 999<<20)); n >= 80 {
			t.Errorf("a full line is %d columns, want under 80", n)
		}
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 10 << 20: "10.0 MiB", 3 << 40: "3.0 TiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestProgressLine drives a progress line through polls with a fake clock.
func TestProgressLine(t *testing.T) {
	const clr = "\r\x1b[K"
	now := time.Unix(1000, 0)
	step := func(d time.Duration) { now = now.Add(d) }
	for _, tc := range []struct {
		name  string
		tty   bool
		polls []*api.Progress
		steps []time.Duration // clock advance before each poll
		ok    bool            // the task succeeded
		want  string
	}{
		{
			name:  "not a terminal: dots",
			polls: []*api.Progress{nil, {Phase: "download", Done: 1, Total: 4}, {Phase: "download", Done: 2, Total: 4}},
			ok:    true,
			want:  "...\n",
		},
		{
			name:  "terminal: bar, rate, full on success",
			tty:   true,
			polls: []*api.Progress{nil, {Phase: "download", Done: 0, Total: 100 << 20}, {Phase: "download", Done: 10 << 20, Total: 100 << 20}, {Phase: "download", Done: 30 << 20, Total: 100 << 20}, nil},
			steps: []time.Duration{0, time.Second, time.Second, time.Second, time.Second},
			ok:    true,
			want: "." +
				clr + "download [------------------------]   0%  0 B / 100.0 MiB" +
				clr + "download [##----------------------]  10%  10.0 MiB / 100.0 MiB  10.0 MiB/s" +
				// 0.3*20 + 0.7*10 = 13 MiB/s
				clr + "download [#######-----------------]  30%  30.0 MiB / 100.0 MiB  13.0 MiB/s" +
				clr + "download [########################] 100%  100.0 MiB / 100.0 MiB  13.0 MiB/s" +
				"\n",
		},
		{
			name:  "terminal: a restart resets the rate",
			tty:   true,
			polls: []*api.Progress{{Phase: "download", Done: 50, Total: 100}, {Phase: "download", Done: 10, Total: 100}, {Phase: "download", Done: 20, Total: 100}},
			steps: []time.Duration{0, time.Second, time.Second},
			want: clr + "download [############------------]  50%  50 B / 100 B" +
				clr + "download [##----------------------]  10%  10 B / 100 B" +
				clr + "download [####--------------------]  20%  20 B / 100 B  10 B/s" +
				"\n",
		},
		{
			name:  "terminal: failure keeps the last bar",
			tty:   true,
			polls: []*api.Progress{{Phase: "download", Done: 5, Total: -1}},
			want:  clr + "download 5 B\n",
		},
		{
			name: "terminal: no progress at all",
			tty:  true, polls: []*api.Progress{nil, nil},
			ok:   true,
			want: "..\n",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			l := &progressLine{w: &b, tty: tc.tty, now: func() time.Time { return now }}
			for i, p := range tc.polls {
				if i < len(tc.steps) {
					step(tc.steps[i])
				}
				l.poll(p)
			}
			if tc.ok {
				l.succeeded()
			}
			l.end()
			l.end() // idempotent
			if b.String() != tc.want {
				t.Errorf("output\n%q\nwant\n%q", b.String(), tc.want)
			}
		})
	}
}

// runWith runs the CLI with stderr as given and env overrides.
func (h *harness) runWith(stderr io.Writer, env map[string]string, args ...string) (int, string) {
	h.t.Helper()
	var out bytes.Buffer
	c := &cli{
		stdin: strings.NewReader(""), stdout: &out, stderr: stderr,
		env: func(k string) string {
			if v, ok := env[k]; ok {
				return v
			}
			return h.env[k]
		},
		isTerminal: func(io.Reader) bool { return h.terminal },
	}
	code := c.main(h.t.Context(), args)
	return code, out.String()
}

// TestWaitProgress runs 'vm start --wait' against the fake API, whose
// running tasks report download progress 1 of 2 bytes: a terminal shows a
// bar ending full, anything else the seed's dots.
func TestWaitProgress(t *testing.T) {
	for _, tc := range []struct {
		name string
		tty  bool
		term string
		want func(string) bool
	}{
		{"pipe", false, "xterm", func(s string) bool { return s == "...\n" }},
		{"dumb terminal", true, "dumb", func(s string) bool { return s == "...\n" }},
		{"terminal", true, "xterm", func(s string) bool {
			frames := strings.Split(s, "\r\x1b[K")
			return frames[0] == "" && len(frames) == 5 &&
				frames[1] == "download [############------------]  50%  1 B / 2 B" &&
				strings.HasPrefix(frames[2], "download [############------------]  50%  1 B / 2 B  0 B/s") &&
				strings.HasPrefix(frames[4], "download [########################] 100%  2 B / 2 B") &&
				strings.HasSuffix(s, "\n") && !strings.Contains(s, ".")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.api.AddVM(api.VM{Name: "web-1", Status: api.StatusStopped})
			stderr := &ttyBuffer{tty: tc.tty}
			code, stdout := h.runWith(stderr, map[string]string{"TERM": tc.term}, "vm", "start", "web-1", "--wait")
			if code != 0 || stdout != "start task=task-1 status=pending\nvm running task=task-1\n" {
				t.Errorf("exit %d stdout %q", code, stdout)
			}
			if !tc.want(stderr.String()) {
				t.Errorf("stderr = %q", stderr.String())
			}
		})
	}
}
