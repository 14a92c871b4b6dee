// Package buildinfo turns the module and VCS data the go command stamps
// into a binary into one version token: what the agent sends as
// agent_version and in its User-Agent, and what --version prints.
//
// The token is a semantic version a control plane can compare: the
// module's version for a tagged build ('go install ...@v0.3.0'), else a
// Go pseudo-version from the VCS revision and commit time
// (v0.0.0-20261207175835-7baafebdd487, "+dirty" when the tree had local
// changes), else v0.0.0-unknown for a build with no VCS data
// (-buildvcs=false, a tarball).
package buildinfo

import (
	"fmt"
	"regexp"
	"runtime/debug"
	"strings"
	"time"
)

// Info is what a binary knows of its build.
type Info struct {
	Version  string // the token
	Revision string // full VCS revision, "unknown" without VCS data
	Time     string // commit time (RFC 3339), "" without VCS data
	Modified bool   // built from a tree with local changes
	Go       string // the Go version
}

// Read returns the running binary's Info.
func Read() Info {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Info{Version: unknown, Revision: "unknown"}
	}
	return FromBuildInfo(bi)
}

const unknown = "v0.0.0-unknown"

// semver accepts what Go puts in Main.Version for a real version.
var semver = regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)

// FromBuildInfo computes Info from build info.
func FromBuildInfo(bi *debug.BuildInfo) Info {
	in := Info{Revision: "unknown", Go: bi.GoVersion}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.time":
			in.Time = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	switch {
	case semver.MatchString(bi.Main.Version):
		in.Version = bi.Main.Version
	case in.Revision != "unknown":
		stamp := "00000000000000"
		if t, err := time.Parse(time.RFC3339, in.Time); err == nil {
			stamp = t.UTC().Format("20060102150405")
		}
		rev := in.Revision
		if len(rev) > 12 {
			rev = rev[:12]
		}
		in.Version = fmt.Sprintf("v0.0.0-%s-%s", stamp, rev)
		if in.Modified {
			in.Version += "+dirty"
		}
	default:
		in.Version = unknown
	}
	return in
}

// String is the --version line: "PROG VERSION revision REV[ modified]
// [built TIME] GOVERSION".
func (in Info) String(prog string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s revision %s", prog, in.Version, in.Revision)
	if in.Modified {
		b.WriteString(" modified")
	}
	if in.Time != "" {
		b.WriteString(" built " + in.Time)
	}
	if in.Go != "" {
		b.WriteString(" " + in.Go)
	}
	return b.String()
}
