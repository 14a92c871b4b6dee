package cloudinit

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

const mimeUserData = "Content-Type: multipart/mixed; boundary=\"===XX==\"\r\n" +
	"MIME-Version: 1.0\r\n" +
	"\r\n" +
	"--===XX==\r\n" +
	"Content-Type: text/cloud-config; charset=\"us-ascii\"\r\n" +
	"Content-Transfer-Encoding: 7bit\r\n" +
	"\r\n" +
	"#cloud-config\r\n" +
	"packages: [htop]\r\n" +
	"--===XX==\r\n" +
	"Content-Type: text/x-shellscript\r\n" +
	"\r\n" +
	"#!/bin/sh\r\n" +
	"echo hi\r\n" +
	"--===XX==--\r\n"

func gzipped(t testing.TB, s string) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	if _, err := zw.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestValidateUserDataAccepts(t *testing.T) {
	tests := []struct {
		name string
		data string
	}{
		{"cloud-config", "#cloud-config\nusers:\n  - name: ops\n    ssh_authorized_keys: [ssh-ed25519 AAAA]\npackages: [htop]\n"},
		{"cloud-config empty", "#cloud-config\n"},
		{"cloud-config lone null", "#cloud-config\n---\n"},
		{"cloud-config CRLF", "#cloud-config\r\nhostname: x\r\n"},
		{"cloud-config header case and leading space", "\n  #Cloud-Config\nhostname: x\n"},
		{"cloud-config duplicate keys (PyYAML keeps the last)", "#cloud-config\na: 1\na: 2\n"},
		{"cloud-config all-digit-looking values", "#cloud-config\nmac: 52:54:00:12:34:56\nmode: 0755\n"},
		{"cloud-config known tags", "#cloud-config\na: !!int 12\nb: !!binary aGk=\nc: !!set {x, y}\nd: !!str 1\ne: !!timestamp 2001-12-14\n"},
		{"cloud-config YAML 1.1 tagged values", "#cloud-config\na: !!int 1:30\nb: !!bool yes\nc: !!null x\n"},
		{"cloud-config merge", "#cloud-config\nb: &m {x: 1}\na:\n  <<: *m\nc:\n  <<: [*m, {y: 2}]\n"},
		{"cloud-config int key", "#cloud-config\n{0: a}\n"},
		{"shell script", "#!/bin/sh\necho hello\n"},
		{"script with binary", "#!/usr/bin/perl\n\x00\x01\xff"},
		{"boothook", "#cloud-boothook\n#!/bin/sh\necho boot\n"},
		{"part-handler", "#part-handler\ndef list_types(): return []\n"},
		{"include", "#include\nhttps://example.com/a.yaml\n\n# comment\nhttp://10.0.0.1/b\nfile:///etc/c\n/abs/d\n"},
		{"include-once", "#include-once\nhttps://example.com/a.yaml\n"},
		{"include inline", "#include https://example.com/a.yaml\n"},
		{"include empty", "#include\n"},
		{"cloud-config-archive", "#cloud-config-archive\n- type: text/x-shellscript\n  content: echo hi\n- '#cloud-config\n\n  a: 1'\n"},
		{"cloud-config-jsonp", "#cloud-config-jsonp\n[{\"op\": \"add\", \"path\": \"/a\", \"value\": 1}]\n"},
		{"jinja cloud-config", "## template: jinja\n#cloud-config\nhostname: {{ ds.meta_data.local_hostname }}\n"},
		{"jinja script", "## template: jinja\n#!/bin/sh\necho {{ v1.instance_id }}\n"},
		{"mime multipart", mimeUserData},
		{"mime multipart LF", strings.ReplaceAll(mimeUserData, "\r\n", "\n")},
		{"mime version first", "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n\n#!/bin/sh\n--b--\n"},
		{"mime from first", "From: nobody\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n\n#!/bin/sh\n--b--\n"},
		{"mime base64 cloud-config part", "Content-Type: multipart/mixed; boundary=b\nMIME-Version: 1.0\n\n--b\nContent-Type: text/cloud-config\n" +
			"Content-Transfer-Encoding: base64\n\nI2Nsb3VkLWNvbmZpZwphOiAxCg==\n--b--\n"},
		{"gzip", string(gzipped(t, "#cloud-config\na: 1\n"))},
		{"gzip of anything (opaque)", string(gzipped(t, "not user-data"))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := ValidateUserData([]byte(tt.data), Limits{}); err != nil {
				t.Errorf("got %v, want nil", err)
			}
		})
	}
}

func TestValidateUserDataRejects(t *testing.T) {
	tests := []struct {
		name string
		data string
		want string // substring of the message
	}{
		{"plain text", "hello world\n", "not a format cloud-init recognises"},
		{"empty", "", "user-data: empty document"},
		{"YAML without header", "users:\n  - name: x\n", "YAML without a #cloud-config first line"},
		{"YAML list without header", "- a\n- b\n", "not a format cloud-init recognises"},
		{"cloud-config list", "#cloud-config\n- a\n- b\n", "line 2, column 1: #cloud-config must be a YAML mapping (key: value), got a list"},
		{"cloud-config string", "#cloud-config\nhello\n", "line 2, column 1: #cloud-config must be a YAML mapping (key: value), got a string"},
		{"cloud-config number", "#cloud-config\n42\n", "got a number"},
		{"list as key", "#cloud-config\n? [a]\n: 1\n", "line 2, column 3: a mapping key must be a scalar, not a list"},
		{"mapping as key", "#cloud-config\nok: 1\nx:\n  ? {a: 1}\n  : x\n", "line 4, column 5: a mapping key must be a scalar, not a mapping"},
		{"empty flow list as key", "#Cloud-Config\n{[]}", "a mapping key must be a scalar, not a list"},
		{"alias to list as key", "#cloud-config\nl: &l [1]\n*l : 2\n", "line 3, column 1: a mapping key must be a scalar, not a list"},
		{"unknown tag", "#cloud-config\na: !Ref x\n", "line 2, column 4: tag !Ref is not one cloud-init's YAML loader knows"},
		{"python tag", "#cloud-config\na: !!python/name:os.system\n", "tag !!python/name:os.system is not one"},
		{"bad merge", "#cloud-config\na:\n  <<: 1\n", "line 3, column 7: a merge (<<) needs a mapping or a list of mappings"},
		{"bad merge list", "#cloud-config\na:\n  <<: [{x: 1}, 2]\n", "line 3, column 16: a merge (<<) list must hold only mappings"},
		{"mapping values", "#cloud-config\na: 1\nb: c: d\n", "line 3, column 5: invalid YAML: mapping values are not allowed in this context"},
		{"bad indentation", "#cloud-config\nusers:\n  - name: x\n   bad: 1\n", "line 4, column 4: invalid YAML: did not find expected '-' indicator"},
		{"mapping in list", "#cloud-config\nruncmd:\n  - echo hi\n  foo: bar\n", "line 4, column 6: invalid YAML"},
		{"unclosed flow", "#cloud-config\na: 1\nb: {x\n", "line 3, column 5: invalid YAML: did not find expected ',' or '}'"},
		{"unterminated quote", "#cloud-config\na: \"open\nb: 1\n", "line 2, column 4: invalid YAML: found unexpected end of stream"},
		{"tab indentation", "#cloud-config\n\ta: 1\n", "line 2, column 1: invalid YAML: found character that cannot start any token"},
		{"unknown alias", "#cloud-config\na: *nope\n", "line 2, column 8: invalid YAML: unknown anchor 'nope' referenced"},
		{"two documents", "#cloud-config\na: 1\n---\nb: 2\n", "line 3, column 1: a second YAML document"},
		{"control character", "#cloud-config\nkey: \a\n", "line 2, column 6: character U+0007 is not allowed in YAML"},
		{"invalid UTF-8", "#cloud-config\nkey: caf\xe9\n", "line 2, column 9: invalid UTF-8"},
		{"BOM", "\xef\xbb\xbf#cloud-config\na: 1\n", "byte order mark"},
		{"archive not a list", "#cloud-config-archive\na: 1\n", "line 2, column 1: #cloud-config-archive must be a YAML list, got a mapping"},
		{"archive nested list", "#cloud-config-archive\n- [a]\n", "entries must be mappings or strings"},
		{"jsonp bad JSON", "#cloud-config-jsonp\n[{\"op\": \"add\", x}]", "line 2, column 16: #cloud-config-jsonp: invalid JSON"},
		{"jsonp not a list", "#cloud-config-jsonp\n{}", "#cloud-config-jsonp must be a JSON list"},
		{"include not a URL", "#include\nhttps://ok.example/\nnot a url\n", "line 3: #include lines must be absolute URLs"},
		{"include relative", "#include\nfoo/bar\n", "line 2: #include lines"},
		{"jinja bad header", "## template: jinja2\n#cloud-config\n", `line 1: the jinja header line must be exactly "## template: jinja"`},
		{"jinja no body", "## template: jinja\n", "must be followed by the template"},
		{"jinja unknown body", "\n## template: jinja\n\nhello {{ x }}\n", "line 4: a jinja template must render"},
		{"mime without MIME-Version", "Content-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b--\n", "no MIME-Version header"},
		{"mime not multipart", "Content-Type: text/cloud-config\nMIME-Version: 1.0\n\n#cloud-config\n", "must be multipart/*, got text/cloud-config"},
		{"mime no boundary", "Content-Type: multipart/mixed\nMIME-Version: 1.0\n\n", "no boundary"},
		{"mime wrong boundary", strings.ReplaceAll(mimeUserData, "boundary=\"===XX==\"", "boundary=other"), "has no parts"},
		{"mime bad media type", "Content-Type: multipart/\nMIME-Version: 1.0\n\n", "Content-Type header does not parse"},
		{"mime truncated", mimeUserData[:len(mimeUserData)-20], "MIME part 2 does not parse"},
		{"jinja header without spaces (cloud-init matches the exact prefix)", "##template:jinja\n#cloud-config\n", "not a format cloud-init recognises"},
		{"mime bad cloud-config part", strings.Replace(mimeUserData, "packages: [htop]", "- htop", 1), "user-data MIME part 1: line 2, column 1: #cloud-config must be a YAML mapping"},
		{"mime bad base64 part", "Content-Type: multipart/mixed; boundary=b\nMIME-Version: 1.0\n\n--b\nContent-Transfer-Encoding: base64\n\n!!!\n--b--\n", "MIME part 1 does not parse"},
		{"upstart job (dropped by cloud-init)", "#upstart-job\nexec x\n", "not a format cloud-init recognises"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateUserData([]byte(tt.data), Limits{})
			if !errcode.Is(err, errcode.ValidationFailed) {
				t.Fatalf("got %v, want validation_failed", err)
			}
			if got := errcode.MessageOf(err); !strings.Contains(got, tt.want) {
				t.Errorf("message %q\nwant it to contain %q", got, tt.want)
			}
		})
	}
}

func TestValidateUserDataSize(t *testing.T) {
	big := []byte("#cloud-config\n" + "a: " + strings.Repeat("x", DefaultMaxUserData) + "\n")
	err := ValidateUserData(big, Limits{})
	want := fmt.Sprintf("user-data: %d bytes is over the limit of 65536 bytes", len(big))
	if !errcode.Is(err, errcode.ValidationFailed) || errcode.MessageOf(err) != want {
		t.Errorf("got %v, want validation_failed: %s", err, want)
	}

	exact := append([]byte("#!/bin/sh\n"), bytes.Repeat([]byte("#"), DefaultMaxUserData-10)...)
	if err := ValidateUserData(exact, Limits{}); err != nil {
		t.Errorf("exactly at the limit: %v", err)
	}

	small := Limits{MaxUserData: 16 << 10}
	err = ValidateUserData(exact, small)
	if want := "65536 bytes is over the limit of 16384 bytes"; !strings.Contains(errcode.MessageOf(err), want) {
		t.Errorf("custom limit: got %v, want %q", err, want)
	}
	if err := ValidateUserData(big, Limits{MaxUserData: 1 << 20}); err != nil {
		t.Errorf("raised limit: %v", err)
	}
}

// Error messages go to the control plane and into logs: they must never
// quote the user-data, which holds passwords and keys.
func TestValidateUserDataDoesNotLeak(t *testing.T) {
	const secret = "hunter2-s3cr3t"
	for _, data := range []string{
		secret,
		"#cloud-config\npassword: " + secret + "\nbad: : x\n",
		"#cloud-config\n- " + secret + "\n",
		"#include\n" + secret + " x\n",
		"Content-Type: multipart/mixed; boundary=b\nMIME-Version: 1.0\n" + secret + "\n\n--b\n\nx\n--b--\n",
		"## template: jinja\n" + secret + "\n",
		"#cloud-config-jsonp\n" + secret,
		"password: " + secret + "\n",
	} {
		err := ValidateUserData([]byte(data), Limits{})
		if err == nil {
			t.Errorf("%q: accepted", data)
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("error quotes the user-data: %v", err)
		}
	}
}

func TestVendorDataValidatedLikeUserData(t *testing.T) {
	s := Seed{InstanceID: "i-1", Hostname: "h", VendorData: []byte("#cloud-config\n- x\n")}
	err := s.Validate(Limits{})
	if !errcode.Is(err, errcode.ValidationFailed) || !strings.HasPrefix(errcode.MessageOf(err), "vendor-data: line 2, column 1:") {
		t.Errorf("got %v", err)
	}
}
