package protocol_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// TestDocExamples holds docs/protocol.md to the wire types: every JSON
// example in it decodes into one of the protocol's messages with no field
// the type lacks, and names every field the type always sends. A renamed
// field fails here, not at a control plane.
func TestDocExamples(t *testing.T) {
	doc, err := os.ReadFile("../../docs/protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	types := []any{
		protocol.RegisterRequest{}, protocol.RegisterResponse{},
		protocol.LeaseRequest{}, protocol.LeaseResponse{},
		protocol.ProgressRequest{}, protocol.ProgressResponse{},
		protocol.CompleteRequest{}, protocol.HeartbeatRequest{}, protocol.HeartbeatResponse{},
		api.ErrorEnvelope{},
	}
	blocks := regexp.MustCompile("(?s)```json\n(.*?)```").FindAllSubmatchIndex(doc, -1)
	if len(blocks) < 8 {
		t.Fatalf("%d JSON examples in docs/protocol.md", len(blocks))
	}
	for _, b := range blocks {
		line := bytes.Count(doc[:b[0]], []byte("\n")) + 1
		ex := doc[b[2]:b[3]]
		var why []string
		matched := ""
		for _, typ := range types {
			err := fits(ex, reflect.TypeOf(typ))
			if err == nil {
				matched = reflect.TypeOf(typ).String()
				break
			}
			why = append(why, fmt.Sprintf("%T: %v", typ, err))
		}
		if matched == "" {
			t.Errorf("docs/protocol.md:%d: the example is no protocol message:\n%s\n%s", line, ex, strings.Join(why, "\n"))
		}
	}
}

// fits decodes ex into a new typ refusing unknown fields, then checks that
// every field the type always sends (no omitempty) is in ex, at every
// level.
func fits(ex []byte, typ reflect.Type) error {
	v := reflect.New(typ)
	dec := json.NewDecoder(bytes.NewReader(ex))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v.Interface()); err != nil {
		return err
	}
	back, err := json.Marshal(v.Interface())
	if err != nil {
		return err
	}
	var want, have any
	json.Unmarshal(back, &want)
	json.Unmarshal(ex, &have)
	return missing("", want, have)
}

// missing reports a key of want (the type re-encoded) absent from have
// (the example).
func missing(path string, want, have any) error {
	switch w := want.(type) {
	case map[string]any:
		h, ok := have.(map[string]any)
		if !ok {
			return nil
		}
		keys := make([]string, 0, len(w))
		for k := range w {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			hv, ok := h[k]
			if !ok {
				return fmt.Errorf("missing field %s%s", path, k)
			}
			if err := missing(path+k+".", w[k], hv); err != nil {
				return err
			}
		}
	case []any:
		h, ok := have.([]any)
		if !ok {
			return nil
		}
		for i := range min(len(w), len(h)) {
			if err := missing(fmt.Sprintf("%s%d.", path, i), w[i], h[i]); err != nil {
				return err
			}
		}
	}
	return nil
}
