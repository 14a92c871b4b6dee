package vm

import (
	"context"
	"fmt"

	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// userNIC returns the index of the VM's user-mode (SLIRP) NIC, or -1.
func userNIC(s *Spec) int {
	if len(s.NICs) == 0 {
		return 0 // the implicit SLIRP NIC
	}
	for i, n := range s.NICs {
		if n.Type == NICUser {
			return i
		}
	}
	return -1
}

// AddForward adds a host port forward to a VM's user-mode NIC: at once
// through HMP hostfwd_add when QEMU runs (QEMU 7.2 has no QMP command for
// it), and in the spec so the next start has it. Forwards of bridged VMs
// are the agent's proxy, not QEMU's: errcode.ValidationFailed here.
func (e *Engine) AddForward(ctx context.Context, name string, r portfwd.Rule) (View, error) {
	return e.op(ctx, name, "forward_add", func(m *machine) error {
		m.mu.Lock()
		spec := m.st.Spec
		p := m.proc
		m.mu.Unlock()
		i := userNIC(&spec)
		if i < 0 {
			return errcode.New(errcode.ValidationFailed, "vm %q has no user-mode NIC: its forwards are the agent's proxy", name)
		}
		var existing []portfwd.Rule
		if i < len(spec.NICs) {
			existing = spec.NICs[i].Forwards
		}
		rules, err := portfwd.Validate(existing, []portfwd.Rule{r})
		if err != nil {
			return err
		}
		if p != nil {
			if err := portfwd.AddHostFwd(ctx, m.hmp(p), fmt.Sprintf("net%d", i), rules[0]); err != nil {
				return err
			}
		} else if err := portfwd.CheckFree(ctx, rules); err != nil {
			return err
		}
		return m.editForwards(i, func(fs []portfwd.Rule) []portfwd.Rule { return append(fs, rules[0]) })
	})
}

// RemoveForward removes a host port forward from a VM's user-mode NIC.
func (e *Engine) RemoveForward(ctx context.Context, name string, r portfwd.Rule) (View, error) {
	return e.op(ctx, name, "forward_remove", func(m *machine) error {
		r, err := r.Normalize()
		if err != nil {
			return err
		}
		m.mu.Lock()
		spec := m.st.Spec
		p := m.proc
		m.mu.Unlock()
		i := userNIC(&spec)
		found := false
		if i >= 0 && i < len(spec.NICs) {
			for _, f := range spec.NICs[i].Forwards {
				if f.Proto == r.Proto && f.HostPort == r.HostPort {
					r, found = f, true
				}
			}
		}
		if !found {
			return errcode.New(errcode.NotFound, "vm %q has no forward %s", name, r)
		}
		if p != nil {
			if err := portfwd.RemoveHostFwd(ctx, m.hmp(p), fmt.Sprintf("net%d", i), r); err != nil {
				return err
			}
		}
		return m.editForwards(i, func(fs []portfwd.Rule) []portfwd.Rule {
			out := fs[:0:0]
			for _, f := range fs {
				if f != r {
					out = append(out, f)
				}
			}
			return out
		})
	})
}

// hmp runs HMP command lines through QMP human-monitor-command.
func (m *machine) hmp(p *process) portfwd.HMPFunc {
	return func(ctx context.Context, line string) (string, error) {
		var out string
		err := p.mon.Execute(ctx, "human-monitor-command", map[string]any{"command-line": line}, &out)
		return out, err
	}
}

// editForwards changes the forwards of NIC i in the spec (and in a pending
// next spec) and persists it.
func (m *machine) editForwards(i int, fn func([]portfwd.Rule) []portfwd.Rule) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range []*Spec{&m.st.Spec, m.st.Next} {
		if s == nil {
			continue
		}
		if len(s.NICs) == 0 {
			s.NICs = []NIC{{Type: NICUser, MAC: MACFromUUID(s.UUID, 0)}}
		}
		s.NICs = append([]NIC(nil), s.NICs...)
		s.NICs[i].Forwards = fn(append([]portfwd.Rule(nil), s.NICs[i].Forwards...))
	}
	return m.persistLocked()
}
