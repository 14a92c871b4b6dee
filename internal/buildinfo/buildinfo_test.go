package buildinfo

import (
	"runtime/debug"
	"testing"
)

func TestFromBuildInfo(t *testing.T) {
	vcs := []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "7baafebdd487df492bb40f16ef53784f7a4aa0d6"},
		{Key: "vcs.time", Value: "2026-12-07T17:58:35Z"}, {Key: "vcs.modified", Value: "false"}}
	dirty := append(append([]debug.BuildSetting(nil), vcs[:3]...), debug.BuildSetting{Key: "vcs.modified", Value: "true"})
	for _, tc := range []struct {
		name     string
		main     string
		settings []debug.BuildSetting
		want     string
	}{
		{"tagged", "v0.3.0", vcs, "v0.3.0"},
		{"go's own pseudo-version", "v0.0.0-20261207175835-7baafebdd487", vcs, "v0.0.0-20261207175835-7baafebdd487"},
		{"devel with vcs", "(devel)", vcs, "v0.0.0-20261207175835-7baafebdd487"},
		{"devel, modified tree", "(devel)", dirty, "v0.0.0-20261207175835-7baafebdd487+dirty"},
		{"no vcs data", "(devel)", nil, "v0.0.0-unknown"},
		{"empty", "", nil, "v0.0.0-unknown"},
	} {
		got := FromBuildInfo(&debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: tc.main}, Settings: tc.settings})
		if got.Version != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got.Version, tc.want)
		}
		if !semver.MatchString(got.Version) {
			t.Errorf("%s: %q is not a semantic version", tc.name, got.Version)
		}
	}
	in := FromBuildInfo(&debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}, Settings: dirty})
	if s := in.String("otherix-agent"); s != "otherix-agent v0.0.0-20261207175835-7baafebdd487+dirty revision 7baafebdd487df492bb40f16ef53784f7a4aa0d6 modified built 2026-12-07T17:58:35Z go1.26.8" {
		t.Errorf("String: %q", s)
	}
}
