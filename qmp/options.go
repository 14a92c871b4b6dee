package qmp

import (
	"maps"
	"time"

	"go.uber.org/zap"
)

// DefaultTimeout bounds a command or a Dial whose context has no deadline
// and whose command has no entry in the timeout table.
const DefaultTimeout = 10 * time.Second

// DefaultCommandTimeouts returns a fresh copy of the per-command timeouts
// in effect unless WithCommandTimeouts overrides them. Commands that only
// read state or flip a run state answer at once; the longer entries are for
// commands that do I/O inside QEMU's main loop.
func DefaultCommandTimeouts() map[string]time.Duration {
	return map[string]time.Duration{
		"qmp_capabilities": 5 * time.Second,
		"query-status":     5 * time.Second,
		"query-version":    5 * time.Second,
		"query-commands":   5 * time.Second,
		"quit":             5 * time.Second,
		"system_powerdown": 5 * time.Second,
		"system_reset":     5 * time.Second,
		"stop":             5 * time.Second,
		"cont":             5 * time.Second,
		"screendump":       30 * time.Second,
		"blockdev-add":     30 * time.Second,
		"blockdev-del":     30 * time.Second,
		"device_add":       30 * time.Second,
		"device_del":       30 * time.Second,
	}
}

type options struct {
	log            *zap.Logger
	defaultTimeout time.Duration
	timeouts       map[string]time.Duration
	observe        func(cmd string, d time.Duration, err error)
}

// WithObserver calls f after every command with its latency and error
// (metrics). f must not block.
func WithObserver(f func(cmd string, d time.Duration, err error)) Option {
	return func(o *options) { o.observe = f }
}

// Option configures Dial.
type Option func(*options)

func newOptions(opts []Option) options {
	o := options{
		log:            zap.NewNop(),
		defaultTimeout: DefaultTimeout,
		timeouts:       DefaultCommandTimeouts(),
	}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithLogger sets the logger (default: no-op). The client logs only what it
// cannot return: replies nobody waits for, malformed messages.
func WithLogger(l *zap.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// WithDefaultTimeout sets the timeout used for Dial when its context has no
// deadline, and for commands missing from the timeout table (default 10s).
func WithDefaultTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.defaultTimeout = d
		}
	}
}

// WithCommandTimeouts merges t over the per-command timeout table (see
// DefaultCommandTimeouts). An entry <= 0 removes the command from the
// table, so it falls back to the default timeout.
func WithCommandTimeouts(t map[string]time.Duration) Option {
	return func(o *options) {
		o.timeouts = maps.Clone(o.timeouts)
		for cmd, d := range t {
			if d <= 0 {
				delete(o.timeouts, cmd)
				continue
			}
			o.timeouts[cmd] = d
		}
	}
}

func (o *options) timeoutFor(cmd string) time.Duration {
	if d, ok := o.timeouts[cmd]; ok {
		return d
	}
	return o.defaultTimeout
}
