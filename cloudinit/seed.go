// Package cloudinit builds cloud-init NoCloud seed ISOs.
//
// A seed is an ISO9660 image with volume label "cidata" whose root holds
// meta-data, and user-data, network-config and vendor-data when given.
// cloud-init's NoCloud datasource finds it by that label at boot.
//
// Validation mirrors what cloud-init itself accepts, so a mistake is reported
// to the user when the VM is created rather than silently ignored in the
// guest: see ValidateUserData and ValidateNetworkConfig. Errors carry
// errcode.ValidationFailed and never quote the user's data back, since
// user-data routinely holds passwords and keys.
//
// The image is byte-for-byte deterministic: the same Seed always gives the
// same ISO (see Build for how the time stamps are fixed).
package cloudinit

import (
	"bytes"
	"unicode"
	"unicode/utf8"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Seed is the content of one VM's NoCloud seed.
type Seed struct {
	InstanceID    string // VM uuid; cloud-init reruns per-instance modules when it changes
	Hostname      string // VM name, written as local-hostname
	UserData      []byte // nil = none
	NetworkConfig []byte // nil = none
	VendorData    []byte // nil = none
}

// Limits bounds what a seed may carry.
type Limits struct {
	// MaxUserData is the largest user-data (and vendor-data) accepted, in
	// bytes; 0 means DefaultMaxUserData.
	MaxUserData int
}

// DefaultMaxUserData is the default user-data size limit. Public clouds cap
// user-data between 16 KiB (EC2, OpenStack) and 64 KiB (GCE metadata
// values); 64 KiB keeps every user-data that works on one of them working
// here, and gzip-compressed user-data goes further.
const DefaultMaxUserData = 64 << 10

// MaxNetworkConfig is the largest network-config accepted, in bytes.
const MaxNetworkConfig = 64 << 10

// maxIdentLen bounds instance-id and hostname. 253 is the longest DNS name;
// a VM name or uuid is far shorter.
const maxIdentLen = 253

func (l Limits) maxUserData() int {
	if l.MaxUserData <= 0 {
		return DefaultMaxUserData
	}
	return l.MaxUserData
}

// Empty reports whether the seed carries nothing but meta-data. Such a seed
// is still worth attaching: it names the instance and sets the hostname.
func (s Seed) Empty() bool {
	return s.UserData == nil && s.NetworkConfig == nil && s.VendorData == nil
}

// Validate checks the whole seed: instance-id and hostname, then user-data,
// network-config and vendor-data when present. It returns the first problem
// found, as an errcode.ValidationFailed error.
func (s Seed) Validate(l Limits) error {
	if err := s.validateIdentity(); err != nil {
		return err
	}
	if s.UserData != nil {
		if err := ValidateUserData(s.UserData, l); err != nil {
			return err
		}
	}
	if s.NetworkConfig != nil {
		if err := ValidateNetworkConfig(s.NetworkConfig); err != nil {
			return err
		}
	}
	if s.VendorData != nil {
		// vendor-data has the same formats as user-data.
		if err := validateUserDataAs("vendor-data", s.VendorData, l); err != nil {
			return err
		}
	}
	return nil
}

// validateIdentity checks the two meta-data fields. Both end up in YAML
// (quoted, so any text would parse) but also in the guest's file system:
// cloud-init keeps per-instance state under /var/lib/cloud/instances/<id>/
// and sets the hostname from local-hostname. So: no whitespace, no control
// characters, no '/', not "." or "..", valid UTF-8, bounded length.
func (s Seed) validateIdentity() error {
	if err := checkIdent("instance-id", s.InstanceID); err != nil {
		return err
	}
	return checkIdent("hostname", s.Hostname)
}

func checkIdent(field, v string) error {
	switch {
	case v == "":
		return errcode.New(errcode.ValidationFailed, "%s is empty", field)
	case len(v) > maxIdentLen:
		return errcode.New(errcode.ValidationFailed, "%s is %d bytes, over the limit of %d", field, len(v), maxIdentLen)
	case !utf8.ValidString(v):
		return errcode.New(errcode.ValidationFailed, "%s is not valid UTF-8", field)
	case v == "." || v == "..":
		return errcode.New(errcode.ValidationFailed, "%s %q is not allowed", field, v)
	}
	for i, r := range v {
		if unicode.IsSpace(r) || unicode.IsControl(r) || r == '/' || r == utf8.RuneError {
			return errcode.New(errcode.ValidationFailed, "%s has a forbidden character %q at byte %d", field, r, i)
		}
	}
	return nil
}

// MetaData returns the seed's meta-data file: a YAML mapping with
// instance-id and local-hostname. Values are always double-quoted so that
// cloud-init's YAML 1.1 parser reads them as strings whatever they look like
// (a hostname "yes" or "0123" stays a string). It does not validate; call
// Validate first.
func (s Seed) MetaData() []byte {
	doc := &yaml.Node{Kind: yaml.MappingNode}
	for _, kv := range [][2]string{
		{"instance-id", s.InstanceID},
		{"local-hostname", s.Hostname},
	} {
		doc.Content = append(doc.Content,
			&yaml.Node{Kind: yaml.ScalarNode, Value: kv[0]},
			&yaml.Node{Kind: yaml.ScalarNode, Style: yaml.DoubleQuotedStyle, Value: kv[1]},
		)
	}
	return encodeYAML(doc)
}

// encodeYAML renders a node tree with two-space indentation. Encoding a
// tree built in this package cannot fail.
func encodeYAML(n *yaml.Node) []byte {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(n); err != nil {
		panic("cloudinit: encoding generated YAML: " + err.Error())
	}
	if err := enc.Close(); err != nil {
		panic("cloudinit: encoding generated YAML: " + err.Error())
	}
	return b.Bytes()
}
