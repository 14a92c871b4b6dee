package api

import (
	"regexp"
	"strings"
)

var (
	nameRE = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$`)
	uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
)

// IsUUID reports whether s is a UUID literal (any case).
func IsUUID(s string) bool { return uuidRE.MatchString(strings.ToLower(s)) }

// IsName reports whether s has the syntax of a VM or volume name: a
// hostname label (1..63 of [A-Za-z0-9-], no leading or trailing dash). A
// VM name must not be a UUID literal too (IsUUID).
func IsName(s string) bool { return nameRE.MatchString(s) }
