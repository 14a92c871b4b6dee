package api

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestUpdateVMNullPort: "vnc_port": null is VNCPortAuto and survives a
// round trip (the standalone API's body becomes a vm.update spec);
// absent is not; a field UpdateVM does not know is an error.
func TestUpdateVMNullPort(t *testing.T) {
	for _, tc := range []struct {
		in   string
		auto bool
		port int
	}{
		{`{"vnc_port": null}`, true, 0},
		{`{"vnc_port":null,"vcpus":2}`, true, 0},
		{`{"vcpus":2}`, false, 0},
		{`{"vnc_port":5901}`, false, 5901},
	} {
		var u UpdateVM
		if err := json.Unmarshal([]byte(tc.in), &u); err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		b, err := json.Marshal(u)
		if err != nil {
			t.Fatal(err)
		}
		var again UpdateVM
		if err := json.Unmarshal(b, &again); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		for _, got := range []UpdateVM{u, again} {
			port := 0
			if got.VNCPort != nil {
				port = *got.VNCPort
			}
			if got.VNCPortAuto != tc.auto || port != tc.port {
				t.Errorf("%s (wire %s): auto %v port %d", tc.in, b, got.VNCPortAuto, port)
			}
		}
	}
	var u UpdateVM
	if err := json.Unmarshal([]byte(`{"vnc_prot":5901}`), &u); err == nil || !strings.Contains(err.Error(), "vnc_prot") {
		t.Errorf("an unknown field: %v", err)
	}
}
