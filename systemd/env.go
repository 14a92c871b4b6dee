package systemd

import "strings"

// DefaultPath is the PATH given to child processes.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ChildEnv returns a minimal environment for a child process such as QEMU:
// PATH and LANG=C, then extra ("KEY=value" entries; a later entry replaces
// an earlier one with the same key, so extra may override PATH or LANG).
// Variables that belong to the agent's own contract with systemd
// (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*) and malformed entries are dropped,
// even when passed in extra: a child must never notify, answer the
// watchdog or take over sockets in the agent's name.
func ChildEnv(extra ...string) []string {
	env := make([]string, 0, 2+len(extra))
	index := make(map[string]int, 2+len(extra))
	add := func(kv string) {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" || systemdOwned(k) {
			return
		}
		if i, seen := index[k]; seen {
			env[i] = kv
			return
		}
		index[k] = len(env)
		env = append(env, kv)
	}
	add("PATH=" + DefaultPath)
	add("LANG=C")
	for _, kv := range extra {
		add(kv)
	}
	return env
}

func systemdOwned(key string) bool {
	return key == "NOTIFY_SOCKET" ||
		strings.HasPrefix(key, "WATCHDOG_") ||
		strings.HasPrefix(key, "LISTEN_")
}
