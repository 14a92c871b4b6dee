package cloudinit

import (
	"bytes"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Seed corpora live in testdata/fuzz/<FuzzName>/; the f.Add calls below
// add a few more. Run one with e.g.
//
//	go test ./cloudinit -run '^$' -fuzz FuzzValidateUserData -fuzztime 60s

func FuzzValidateUserData(f *testing.F) {
	for _, s := range []string{
		"#cloud-config\na: 1\n",
		"#!/bin/sh\necho\n",
		"#include\nhttps://example.com/\n",
		"## template: jinja\n#cloud-config\n",
		mimeUserData,
		"\x1f\x8b\x08",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		err := ValidateUserData(data, Limits{})
		if err != nil {
			if !errcode.Is(err, errcode.ValidationFailed) {
				t.Fatalf("error with code %s: %v", errcode.Of(err), err)
			}
			return
		}
		if len(data) == 0 || len(data) > DefaultMaxUserData {
			t.Fatalf("accepted %d bytes", len(data))
		}
		// Accepted #cloud-config is one YAML document that decodes to a
		// mapping or to nothing.
		lc := bytes.ToLower(bytes.TrimLeft(data, " \t\r\n\v\f"))
		if bytes.HasPrefix(lc, []byte("#cloud-config")) &&
			!bytes.HasPrefix(lc, []byte("#cloud-config-archive")) &&
			!bytes.HasPrefix(lc, []byte("#cloud-config-jsonp")) {
			var doc yaml.Node
			if err := yaml.Unmarshal(data, &doc); err != nil {
				t.Fatalf("accepted #cloud-config does not parse: %v", err)
			}
			if len(doc.Content) > 0 {
				if k := doc.Content[0].Kind; k != yaml.MappingNode && doc.Content[0].ShortTag() != "!!null" {
					t.Fatalf("accepted #cloud-config is a %v", k)
				}
			}
		}
	})
}

func FuzzValidateNetworkConfig(f *testing.F) {
	for _, s := range []string{
		"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
		"network:\n  version: 1\n  config:\n    - type: physical\n      name: eth0\n",
		"network:\n  config: disabled\n",
		string(GenerateNetworkConfig([]NIC{{Name: "eth0", MAC: "52:54:00:12:34:56"}})),
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		err := ValidateNetworkConfig(data)
		if err != nil {
			if !errcode.Is(err, errcode.ValidationFailed) {
				t.Fatalf("error with code %s: %v", errcode.Of(err), err)
			}
			return
		}
		var doc yaml.Node
		if err := yaml.Unmarshal(data, &doc); err != nil || len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
			t.Fatalf("accepted network-config is not a YAML mapping: %v", err)
		}
	})
}

// FuzzBuild builds a seed and reads it back with kdomanski/iso9660's reader:
// same files, same bytes, meta-data that decodes to the same identity, and
// the same image on a second build.
func FuzzBuild(f *testing.F) {
	f.Add(testUUID, "web-1", []byte("#cloud-config\na: 1\n"), []byte("version: 2\n"))
	f.Add("i-1", "yes", []byte(nil), []byte(nil))
	f.Add("i\"d", `h\o"st`, []byte{0x1f, 0x8b, 0}, []byte(nil))
	f.Fuzz(func(t *testing.T, id, host string, userData, netConfig []byte) {
		s := Seed{InstanceID: id, Hostname: host}
		if len(userData) > 0 {
			s.UserData = userData
		}
		if len(netConfig) > 0 {
			s.NetworkConfig = netConfig
		}
		var buf bytes.Buffer
		err := Build(&buf, s)
		if s.validateIdentity() != nil {
			if !errcode.Is(err, errcode.ValidationFailed) {
				t.Fatalf("bad identity %q/%q: got %v", id, host, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Build: %v", err)
		}
		img := buf.Bytes()
		files := readSeed(t, img)
		want := map[string][]byte{"meta-data": s.MetaData()}
		if s.UserData != nil {
			want["user-data"] = s.UserData
		}
		if s.NetworkConfig != nil {
			want["network-config"] = s.NetworkConfig
		}
		if len(files) != len(want) {
			t.Fatalf("files %v, want %v", keys(files), keys(want))
		}
		for name, w := range want {
			if !bytes.Equal(files[name], w) {
				t.Fatalf("%s: read back %q, want %q", name, files[name], w)
			}
		}
		var md map[string]string
		if err := yaml.Unmarshal(files["meta-data"], &md); err != nil {
			t.Fatalf("meta-data: %v\n%s", err, files["meta-data"])
		}
		if md["instance-id"] != id || md["local-hostname"] != host {
			t.Fatalf("meta-data round trip: %q", md)
		}
		var again bytes.Buffer
		if err := Build(&again, s); err != nil || !bytes.Equal(img, again.Bytes()) {
			t.Fatalf("second build differs (%v)", err)
		}
	})
}
