package imagecache

import (
	"encoding/json"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestParseImageInfo(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    imageInfo
		wantErr bool
		code    errcode.Code // of checkImage(info, "")
	}{
		{name: "raw", in: `{"virtual-size": 1048576, "filename": "r.raw", "format": "raw", "actual-size": 4096, "dirty-flag": false}`,
			want: imageInfo{Format: "raw", VirtualSize: 1 << 20, ActualSize: 4096}},
		{name: "qcow2", in: `{"virtual-size": 10485760, "format": "qcow2", "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false}}}`,
			want: imageInfo{Format: "qcow2", VirtualSize: 10 << 20}},
		{name: "backing file", in: `{"virtual-size": 1, "format": "qcow2", "backing-filename": "/etc/shadow", "full-backing-filename": "/etc/shadow"}`,
			want: imageInfo{Format: "qcow2", VirtualSize: 1, BackingFile: "/etc/shadow"}, code: errcode.ImageFormatUnsupported},
		{name: "backing format only", in: `{"virtual-size": 1, "format": "qcow2", "backing-filename-format": "raw"}`,
			want: imageInfo{Format: "qcow2", VirtualSize: 1, BackingFile: "(unnamed)"}, code: errcode.ImageFormatUnsupported},
		{name: "data file", in: `{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2", "data": {"data-file": "/dev/sda"}}}`,
			want: imageInfo{Format: "qcow2", VirtualSize: 1, DataFile: "/dev/sda"}, code: errcode.ImageFormatUnsupported},
		{name: "corrupt", in: `{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2", "data": {"corrupt": true}}}`,
			want: imageInfo{Format: "qcow2", VirtualSize: 1, Corrupt: true}, code: errcode.ImageFormatUnsupported},
		{name: "encrypted", in: `{"virtual-size": 1, "format": "qcow2", "encrypted": true}`,
			want: imageInfo{Format: "qcow2", VirtualSize: 1, Encrypted: true}, code: errcode.ImageFormatUnsupported},
		{name: "vmdk", in: `{"virtual-size": 1, "format": "vmdk"}`, want: imageInfo{Format: "vmdk", VirtualSize: 1}, code: errcode.ImageFormatUnsupported},
		{name: "empty image", in: `{"virtual-size": 0, "format": "raw"}`, want: imageInfo{Format: "raw"}, code: errcode.ImageFormatUnsupported},
		{name: "array", in: `[{"virtual-size": 1, "format": "raw"}]`, wantErr: true},
		{name: "no format", in: `{"virtual-size": 1}`, wantErr: true},
		{name: "odd format", in: `{"virtual-size": 1, "format": "raw\n"}`, wantErr: true},
		{name: "negative size", in: `{"virtual-size": -1, "format": "raw"}`, wantErr: true},
		{name: "float size", in: `{"virtual-size": 1.5, "format": "raw"}`, wantErr: true},
		{name: "size overflow", in: `{"virtual-size": 9223372036854775808, "format": "raw"}`, wantErr: true},
		{name: "string size", in: `{"virtual-size": "1", "format": "raw"}`, wantErr: true},
		{name: "trailing data", in: `{"virtual-size": 1, "format": "raw"} {}`, wantErr: true},
		{name: "duplicate key", in: `{"virtual-size": 1, "format": "qcow2", "backing-filename": "/x", "backing-filename": null}`, wantErr: true},
		{name: "case variant key", in: `{"virtual-size": 1, "format": "qcow2", "Backing-Filename": "/x"}`, wantErr: true},
		{name: "bad format-specific", in: `{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2", "data": [1]}}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseImageInfo([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if code := errcode.Of(checkImage(got, "")); code != tt.code {
				t.Fatalf("checkImage code %q, want %q", code, tt.code)
			}
		})
	}
}

// FuzzParseImageInfo: the parser never panics, and whatever it accepts
// keeps the properties the cache relies on; in particular a backing or
// data file present in the JSON is never missed.
func FuzzParseImageInfo(f *testing.F) {
	f.Add([]byte(`{"virtual-size": 1048576, "format": "raw"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := parseImageInfo(b)
		if err != nil {
			return
		}
		if !formatRE.MatchString(info.Format) || info.VirtualSize < 0 || info.ActualSize < 0 {
			t.Fatalf("accepted %+v", info)
		}
		var m map[string]json.RawMessage
		if json.Unmarshal(b, &m) != nil {
			t.Fatalf("accepted input that is not a JSON object: %q", b)
		}
		for _, k := range []string{"backing-filename", "full-backing-filename", "backing-filename-format"} {
			if v, ok := m[k]; ok && string(v) != "null" && info.BackingFile == "" {
				t.Fatalf("missed %s in %q", k, b)
			}
		}
		var fs struct {
			Type string
			Data map[string]json.RawMessage
		}
		if json.Unmarshal(m["format-specific"], &fs) == nil && fs.Type == "qcow2" {
			if v, ok := fs.Data["data-file"]; ok && string(v) != "null" && info.DataFile == "" {
				t.Fatalf("missed data-file in %q", b)
			}
		}
		if (info.BackingFile != "" || info.DataFile != "") && checkImage(info, "") == nil {
			t.Fatalf("checkImage accepted %+v", info)
		}
	})
}
