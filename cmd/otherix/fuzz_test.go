package main

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// FuzzParseManifest: any bytes given to "otherix create -f" give a spec or
// a validation_failed error, never a panic or a hang. An accepted spec has
// the required keys and no mutually exclusive pair, and survives a round
// trip through YAML (what "vm get -o yaml" prints is a manifest). Seeds
// are in testdata/fuzz/FuzzParseManifest. Run it with e.g.
//
//	go test ./cmd/otherix -run '^$' -fuzz FuzzParseManifest -fuzztime 60s
func FuzzParseManifest(f *testing.F) {
	f.Add([]byte("name: web-1\nimage_url: https://cloud-images.example/noble-amd64.img\narch: amd64\n"))
	f.Add([]byte("name: x\nimage_url: u\narch: arm64\nno_cloud_init: true\nuser_data: \"#cloud-config\\n\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Go's fuzzer reports no hang: an input that is not done within
		// a generous bound fails, so that it is saved.
		done := make(chan error, 1)
		go func() { done <- checkManifest(data) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("a manifest of %d bytes was not handled within 10s", len(data))
		}
	})
}

func checkManifest(data []byte) error {
	spec, err := parseManifest(data, "m.yaml")
	if err != nil {
		if code := errcode.Of(err); code != errcode.ValidationFailed {
			return fmt.Errorf("error with code %s: %v", code, err)
		}
		return nil
	}
	if spec.Name == "" || spec.ImageURL == "" || spec.Arch == "" {
		return fmt.Errorf("accepted a manifest without name, image_url or arch: %+v", spec)
	}
	if spec.Firmware != "" && spec.FirmwareID != "" || spec.NoCloudInit && (spec.UserData != "" || spec.NetworkConfig != "") {
		return fmt.Errorf("accepted mutually exclusive keys: %+v", spec)
	}
	for _, s := range []string{spec.Name, spec.ImageURL, spec.Arch, spec.ImageSHA256, spec.Firmware, spec.FirmwareID,
		spec.Format, spec.Pool, spec.Node, spec.Network, spec.UserData, spec.NetworkConfig} {
		if !yamlRoundTrips(s) {
			// yaml.v3's emitter loses a leading line break of a block
			// literal and writes tabs it cannot read back
			// (go-yaml/yaml#963): not the manifest's doing.
			return nil
		}
	}
	out, err := yaml.Marshal(spec)
	if err != nil {
		return fmt.Errorf("marshal %+v: %v", spec, err)
	}
	again, err := parseManifest(out, "again.yaml")
	if err != nil {
		return fmt.Errorf("the manifest of an accepted spec is refused: %v\n%s", err, out)
	}
	if !reflect.DeepEqual(again, spec) {
		return fmt.Errorf("round trip changed the spec:\n%+v\n%+v", spec, again)
	}
	return nil
}

// yamlRoundTrips reports whether yaml.v3 reads back the string it writes.
func yamlRoundTrips(s string) bool {
	b, err := yaml.Marshal(map[string]string{"s": s})
	if err != nil {
		return false
	}
	var back map[string]string
	return yaml.Unmarshal(b, &back) == nil && back["s"] == s
}
