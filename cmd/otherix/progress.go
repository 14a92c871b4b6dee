package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// stderrIsTerminal reports whether progress may be drawn on stderr: it is
// a terminal (a writer may say so itself with IsTerminal, as tests do) and
// $TERM is not "dumb".
func (c *cli) stderrIsTerminal() bool {
	if c.env("TERM") == "dumb" {
		return false
	}
	if t, ok := c.stderr.(interface{ IsTerminal() bool }); ok {
		return t.IsTerminal()
	}
	f, ok := c.stderr.(*os.File)
	return ok && isTerminal(f)
}

// progressLine is what --wait shows on stderr while it polls a task. Not
// on a terminal it prints one dot per poll, as the seed does. On a
// terminal it redraws one line with the task's progress (phase, bar,
// percent, bytes, rate) whenever the task reports some, and prints dots
// while it reports none.
type progressLine struct {
	w   io.Writer
	tty bool
	now func() time.Time

	open  bool // the current line holds dots or a bar: end it with \n
	drawn bool // a bar is on the line

	last     api.Progress // last progress drawn
	lastAt   time.Time
	rate     float64 // bytes per second, smoothed; 0 = unknown yet
	sampled  bool
	rateSeen bool
}

func (c *cli) newProgress() *progressLine {
	return &progressLine{w: c.stderr, tty: c.stderrIsTerminal(), now: time.Now}
}

// barWidth is the bar's width in cells; the whole line stays under 80.
const barWidth = 24

// rateWeight is how much a new sample counts in the smoothed rate.
const rateWeight = 0.3

// poll records one poll of the task; p is its progress (nil when the
// poll failed or the task reports none).
func (l *progressLine) poll(p *api.Progress) {
	if !l.tty || p == nil {
		if l.tty && l.drawn {
			return // keep the bar; a dot would land after it
		}
		fmt.Fprint(l.w, ".")
		l.open = true
		return
	}
	l.sample(*p)
	l.draw(*p)
}

// sample updates the rate from the bytes done since the last progress.
func (l *progressLine) sample(p api.Progress) {
	now := l.now()
	switch {
	case !l.sampled || p.Phase != l.last.Phase || p.Done < l.last.Done:
		l.rate, l.rateSeen = 0, false // a new phase or a restart
	default:
		if dt := now.Sub(l.lastAt).Seconds(); dt > 0 {
			inst := float64(p.Done-l.last.Done) / dt
			if l.rateSeen {
				l.rate = rateWeight*inst + (1-rateWeight)*l.rate
			} else {
				l.rate, l.rateSeen = inst, true
			}
		}
	}
	l.last, l.lastAt, l.sampled = p, now, true
}

func (l *progressLine) draw(p api.Progress) {
	rate := -1.0
	if l.rateSeen {
		rate = l.rate
	}
	// \r and erase-line: the bar replaces the dots or the previous bar.
	fmt.Fprint(l.w, "\r\x1b[K"+formatProgress(p, rate))
	l.open, l.drawn = true, true
}

// succeeded draws a full bar when the last one showed a known total.
func (l *progressLine) succeeded() {
	if l.drawn && l.last.Total > 0 && l.last.Done < l.last.Total {
		p := l.last
		p.Done = p.Total
		l.draw(p)
	}
}

// end ends the line so that what follows starts on a fresh one.
func (l *progressLine) end() {
	if l.open {
		fmt.Fprintln(l.w)
		l.open, l.drawn = false, false
	}
}

// formatProgress renders one progress line: with a known total
//
//	download [##########--------------]  42%  1.1 GiB / 2.6 GiB  25.0 MiB/s
//
// and without one "download 1.1 GiB  25.0 MiB/s". A negative rate is
// unknown and left out.
func formatProgress(p api.Progress, rate float64) string {
	phase := p.Phase
	if phase == "" {
		phase = "progress"
	}
	var b strings.Builder
	b.WriteString(phase)
	if p.Total > 0 {
		done := min(max(p.Done, 0), p.Total)
		filled := int(done * barWidth / p.Total)
		pct := int(done * 100 / p.Total)
		fmt.Fprintf(&b, " [%s%s] %3d%%  %s / %s", strings.Repeat("#", filled), strings.Repeat("-", barWidth-filled), pct, humanBytes(done), humanBytes(p.Total))
	} else {
		fmt.Fprintf(&b, " %s", humanBytes(max(p.Done, 0)))
	}
	if rate >= 0 {
		fmt.Fprintf(&b, "  %s/s", humanBytes(int64(rate)))
	}
	return b.String()
}

// humanBytes renders n in IEC units with one decimal ("1.5 GiB"), plain
// bytes under 1 KiB.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
