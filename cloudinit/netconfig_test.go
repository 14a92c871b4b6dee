package cloudinit

import (
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestValidateNetworkConfig(t *testing.T) {
	tests := []struct {
		name string
		data string
		want string // "" = accepted, else a substring of the message
	}{
		{"v2", "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n", ""},
		{"v2 under network", "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n", ""},
		{"v2 all sections", "version: 2\nrenderer: networkd\nethernets: {e0: {}}\nbonds: {bond0: {interfaces: [e0]}}\n" +
			"bridges: {br0: {}}\nvlans: {v10: {id: 10, link: e0}}\nwifis: {}\ntunnels: {}\nvrfs: {}\nmodems: {}\n" +
			"nm-devices: {}\ndummy-devices: {}\nvirtual-ethernets: {}\n", ""},
		{"v2 match by quoted MAC", "version: 2\nethernets:\n  e:\n    match:\n      macaddress: \"52:54:00:12:34:56\"\n    set-name: eth0\n", ""},
		{"v2 match by MAC with letters", "version: 2\nethernets:\n  e:\n    match:\n      macaddress: 52:54:00:ab:cd:ef\n", ""},
		{"v2 match by name", "version: 2\nethernets:\n  e:\n    match:\n      name: en*\n    dhcp4: true\n", ""},
		{"v2 aliases", "version: 2\nethernets:\n  e0: &d {dhcp4: true}\n  e1: *d\n", ""},
		{"v1", "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    mac_address: '52:54:00:12:34:56'\n" +
			"    subnets:\n      - type: dhcp\n  - type: nameserver\n    address: [10.0.0.1]\n", ""},
		{"v1 under network", "network:\n  version: 1\n  config:\n    - type: physical\n      name: eth0\n", ""},
		{"disabled", "network:\n  config: disabled\n", ""},
		{"disabled top level", "config: disabled\n", ""},

		{"empty", "", "network-config: empty document"},
		{"comments only", "# nothing\n", "network-config: empty document"},
		{"list", "- a\n", "line 1, column 1: must be a YAML mapping, got a list"},
		{"invalid YAML", "version: 2\nethernets: {e: {x: [}\n", "line 2, column 12: invalid YAML: did not find expected node content"},
		{"no version", "ethernets: {}\n", "has no version"},
		{"version 3", "version: 3\n", "line 1, column 10: version must be 2 (netplan) or 1"},
		{"version quoted", "version: \"2\"\n", "version must be 2 (netplan) or 1"},
		{"misindented network", "network:\n  version: 2\nethernets:\n  eth0: {}\n", "line 3, column 1: key \"ethernets\" next to network: belongs inside it"},
		{"network not a mapping", "network: 2\n", "network must be a mapping, got a number"},
		{"unknown v2 key", "version: 2\nethernet:\n  eth0: {}\n", "line 2, column 1: unknown netplan key \"ethernet\""},
		{"section is a list", "version: 2\nethernets:\n  - eth0\n", "line 3, column 3: ethernets must be a mapping of device ids to settings, got a list"},
		{"section is a string", "version: 2\nbridges: br0\n", "bridges must be a mapping"},
		{"device not a mapping", "version: 2\nethernets:\n  eth0: true\n", "line 3, column 9: ethernets.eth0 must be a mapping, got a boolean"},
		{"renderer not a string", "version: 2\nrenderer: [x]\n", "renderer must be a string"},
		{"match not a mapping", "version: 2\nethernets:\n  e:\n    match: x\n", "ethernets.e.match must be a mapping"},
		{"bad MAC", "version: 2\nethernets:\n  e:\n    match:\n      macaddress: zz\n", "line 5, column 19: macaddress \"zz\" is not a MAC address"},
		{"unquoted all-digit MAC", "version: 2\nethernets:\n  e:\n    match:\n      macaddress: 52:54:00:12:34:56\n",
			"line 5, column 19: quote macaddress \"52:54:00:12:34:56\": cloud-init's YAML 1.1 parser reads it as a base-60 number"},
		{"v1 no config", "version: 1\n", "version 1 needs a config list"},
		{"v1 config mapping", "version: 1\nconfig: {}\n", "line 2, column 9: config must be a list, got a mapping"},
		{"v1 entry not mapping", "version: 1\nconfig:\n  - physical\n", "config entry 1 must be a mapping"},
		{"v1 entry no type", "version: 1\nconfig:\n  - name: x\n", "line 3, column 5: config entry 1 has no type"},
		{"v1 unknown type", "version: 1\nconfig:\n  - type: physical\n  - type: phys\n", "line 4, column 11: config entry 2: type must be one of bond, bridge"},
		{"two documents", "version: 2\n---\nversion: 2\n", "a second YAML document"},
		{"too big", "version: 2\n#" + strings.Repeat("x", MaxNetworkConfig), "over the limit of 65536 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateNetworkConfig([]byte(tt.data))
			if tt.want == "" {
				if err != nil {
					t.Errorf("got %v, want nil", err)
				}
				return
			}
			if !errcode.Is(err, errcode.ValidationFailed) {
				t.Fatalf("got %v, want validation_failed", err)
			}
			if got := errcode.MessageOf(err); !strings.Contains(got, tt.want) {
				t.Errorf("message %q\nwant it to contain %q", got, tt.want)
			}
		})
	}
}

func TestGenerateNetworkConfig(t *testing.T) {
	got := string(GenerateNetworkConfig([]NIC{
		{Name: "eth0", MAC: "52:54:00:12:34:56"},
		{Name: "", MAC: "52:54:00:AB:CD:EF"},
		{Name: "eth0", MAC: "52:54:00:00:00:02"},     // repeated name
		{Name: "yes", MAC: "52:54:00:00:00:03"},      // YAML 1.1 boolean
		{Name: "averyveryverylongname", MAC: "x"},    // too long; bad MAC kept
		{Name: "nic1", MAC: "52:54:00:00:00:05"},     // id nic1 is taken: nic5
		{Name: "bad/name", MAC: "52:54:00:00:00:06"}, // nic6
		{Name: "nic6", MAC: "52-54-00-00-00-07"},     // id nic6 is taken: nic7
		{Name: "", MAC: "52:54:00:00:00:08"},         // nic8
		{Name: "nic10", MAC: "52:54:00:00:00:09"},    // takes nic10 ...
		{Name: "", MAC: "52:54:00:00:00:0a"},         // ... so this is nic10-1
	}))
	want := `version: 2
ethernets:
  "eth0":
    match:
      macaddress: "52:54:00:12:34:56"
    set-name: "eth0"
    dhcp4: true
    dhcp6: false
  "nic1":
    match:
      macaddress: "52:54:00:ab:cd:ef"
    dhcp4: true
    dhcp6: false
  "nic2":
    match:
      macaddress: "52:54:00:00:00:02"
    dhcp4: true
    dhcp6: false
  "yes":
    match:
      macaddress: "52:54:00:00:00:03"
    set-name: "yes"
    dhcp4: true
    dhcp6: false
  "nic4":
    match:
      macaddress: "x"
    dhcp4: true
    dhcp6: false
  "nic5":
    match:
      macaddress: "52:54:00:00:00:05"
    set-name: "nic1"
    dhcp4: true
    dhcp6: false
  "nic6":
    match:
      macaddress: "52:54:00:00:00:06"
    dhcp4: true
    dhcp6: false
  "nic7":
    match:
      macaddress: "52:54:00:00:00:07"
    set-name: "nic6"
    dhcp4: true
    dhcp6: false
  "nic8":
    match:
      macaddress: "52:54:00:00:00:08"
    dhcp4: true
    dhcp6: false
  "nic10":
    match:
      macaddress: "52:54:00:00:00:09"
    set-name: "nic10"
    dhcp4: true
    dhcp6: false
  "nic10-1":
    match:
      macaddress: "52:54:00:00:00:0a"
    dhcp4: true
    dhcp6: false
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestGenerateNetworkConfigValidates(t *testing.T) {
	for _, nics := range [][]NIC{
		nil,
		{{Name: "eth0", MAC: "52:54:00:12:34:56"}},
		{{Name: "eth0", MAC: "52:54:00:12:34:56"}, {Name: "eth1", MAC: "52:54:00:12:34:57"}},
	} {
		b := GenerateNetworkConfig(nics)
		if err := ValidateNetworkConfig(b); err != nil {
			t.Errorf("%v: %v\n%s", nics, err, b)
		}
		if string(b) != string(GenerateNetworkConfig(nics)) {
			t.Errorf("%v: not deterministic", nics)
		}
		var doc struct {
			Version   int
			Ethernets map[string]struct {
				Match   struct{ MACAddress string }
				SetName string `yaml:"set-name"`
				DHCP4   bool   `yaml:"dhcp4"`
			}
		}
		if err := yaml.Unmarshal(b, &doc); err != nil {
			t.Fatal(err)
		}
		if doc.Version != 2 || len(doc.Ethernets) != len(nics) {
			t.Errorf("%v: got %+v", nics, doc)
		}
		for _, nic := range nics {
			e := doc.Ethernets[nic.Name]
			if e.SetName != nic.Name || !e.DHCP4 {
				t.Errorf("%v: %s: got %+v", nics, nic.Name, e)
			}
		}
	}
	// A bad MAC from the caller does not slip through.
	if err := ValidateNetworkConfig(GenerateNetworkConfig([]NIC{{Name: "eth0", MAC: "nope"}})); err == nil {
		t.Error("bad MAC accepted")
	}
}
