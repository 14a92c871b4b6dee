package cloudinit

import (
	"fmt"
	"io"
	"strings"
	"testing"
)

// bigCloudConfig returns a #cloud-config just under the default limit.
// With bad set, line bad is broken.
func bigCloudConfig(bad int) []byte {
	var b strings.Builder
	b.WriteString("#cloud-config\nwrite_files:\n")
	for i := 3; b.Len() < DefaultMaxUserData-200; i += 3 {
		if i == bad || (bad < 0 && b.Len() > DefaultMaxUserData-400) {
			b.WriteString("  - path: /etc/x: y\n")
			bad = 0
			continue
		}
		fmt.Fprintf(&b, "  - path: /etc/file%06d\n    content: |\n      some content\n", i)
	}
	return []byte(b.String())
}

// BenchmarkValidateUserData: a valid 64 KiB #cloud-config is the baseline;
// a syntax error costs extra parses to locate (locateSyntaxError), more
// when the error is early in the document.
func BenchmarkValidateUserData(b *testing.B) {
	for _, bc := range []struct {
		name string
		data []byte
		ok   bool
	}{
		{"baseline-valid-64KiB", bigCloudConfig(0), true},
		{"error-line-6-of-64KiB", bigCloudConfig(6), false},
		{"error-last-lines-of-64KiB", bigCloudConfig(-1), false},
		{"script-64KiB", []byte("#!/bin/sh\n" + strings.Repeat("echo\n", DefaultMaxUserData/5-2)), true},
	} {
		if err := ValidateUserData(bc.data, Limits{}); (err == nil) != bc.ok {
			b.Fatalf("%s: %v", bc.name, err)
		}
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(bc.data)))
			for b.Loop() {
				ValidateUserData(bc.data, Limits{})
			}
		})
	}
}

// BenchmarkBuild: building a seed (staging files on disk, writing and
// normalizing the image) against hashing the same bytes as a floor.
func BenchmarkBuild(b *testing.B) {
	s := Seed{
		InstanceID:    testUUID,
		Hostname:      "web-1",
		UserData:      bigCloudConfig(0),
		NetworkConfig: GenerateNetworkConfig([]NIC{{Name: "eth0", MAC: "52:54:00:12:34:56"}}),
	}
	b.Run("baseline-metadata-only", func(b *testing.B) {
		for b.Loop() {
			if err := Build(io.Discard, Seed{InstanceID: testUUID, Hostname: "web-1"}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("64KiB-user-data", func(b *testing.B) {
		for b.Loop() {
			if err := Build(io.Discard, s); err != nil {
				b.Fatal(err)
			}
		}
	})
}
