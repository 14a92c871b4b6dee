package cloudinit_test

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"github.com/kdomanski/iso9660"

	"github.com/otherix/otherix-agent/cloudinit"
)

func ExampleGenerateNetworkConfig() {
	os.Stdout.Write(cloudinit.GenerateNetworkConfig([]cloudinit.NIC{
		{Name: "eth0", MAC: "52:54:00:AB:CD:01"},
	}))
	// Output:
	// version: 2
	// ethernets:
	//   "eth0":
	//     match:
	//       macaddress: "52:54:00:ab:cd:01"
	//     set-name: "eth0"
	//     dhcp4: true
	//     dhcp6: false
}

func ExampleBuild() {
	seed := cloudinit.Seed{
		InstanceID:    "0d4c7a2e-4e2b-4a8f-9d57-2a1f7f0c9b11",
		Hostname:      "web-1",
		UserData:      []byte("#cloud-config\npackages: [htop]\n"),
		NetworkConfig: cloudinit.GenerateNetworkConfig([]cloudinit.NIC{{Name: "eth0", MAC: "52:54:00:ab:cd:01"}}),
	}
	if err := seed.Validate(cloudinit.Limits{}); err != nil {
		fmt.Println(err)
		return
	}
	var iso bytes.Buffer
	if err := cloudinit.Build(&iso, seed); err != nil {
		fmt.Println(err)
		return
	}

	// Read it back as a guest would.
	img, err := iso9660.OpenImage(bytes.NewReader(iso.Bytes()))
	if err != nil {
		fmt.Println(err)
		return
	}
	label, _ := img.Label()
	fmt.Println("label:", label)
	root, _ := img.RootDir()
	files, _ := root.GetChildren()
	for _, f := range files {
		fmt.Printf("%s (%d bytes)\n", f.Name(), f.Size())
		if f.Name() == "meta-data" {
			io.Copy(os.Stdout, f.Reader())
		}
	}
	// Output:
	// label: cidata
	// meta-data (76 bytes)
	// instance-id: "0d4c7a2e-4e2b-4a8f-9d57-2a1f7f0c9b11"
	// local-hostname: "web-1"
	// network-config (135 bytes)
	// user-data (31 bytes)
}

func ExampleValidateUserData() {
	err := cloudinit.ValidateUserData([]byte("#cloud-config\nusers:\n  - name: ops\n   shell: /bin/bash\n"), cloudinit.Limits{})
	fmt.Println(err)
	// Output:
	// validation_failed: user-data: line 4, column 4: invalid YAML: did not find expected '-' indicator
}
