package standalone

import (
	"net/http"
	"strings"
	"testing"
)

// TestBadRequests: data after a JSON body, an explicit out-of-range value
// (0 included: an absent key takes the default, seed 004 says vcpus is
// 1..128) and a malformed cursor are validation_failed; a path no route
// takes is 404 and a method the path does not take is 405 with Allow, each
// in the error envelope.
func TestBadRequests(t *testing.T) {
	t.Parallel()
	z := &apiFuzzer{h: newTestHost(t), dir: t.TempDir()}
	create := `{"name":"web-1","image_url":"https://cloud-images.example/noble-amd64.img","arch":"amd64"`
	for _, tc := range []struct {
		name, method, target, body string
		status                     int
		code, allow                string
	}{
		{"valid create", "POST", "/v1/vms", create + `}`, http.StatusAccepted, "", ""},
		{"absent vcpus", "POST", "/v1/vms", create + `,"vcpus":null}`, http.StatusAccepted, "", ""},
		{"trailing object", "POST", "/v1/vms", create + `} {"name":"web-2"}`, 400, "validation_failed", ""},
		{"trailing garbage", "POST", "/v1/vms", create + `}x`, 400, "validation_failed", ""},
		{"trailing after stop", "POST", "/v1/vms/" + targetVM + "/stop", `{"force":false}]`, 400, "validation_failed", ""},
		{"trailing after pull", "POST", "/v1/images", `{"url":"https://cloud-images.example/a.img"}{}`, 400, "validation_failed", ""},
		{"trailing after patch", "PATCH", "/v1/vms/" + targetVM, `{"autostart":true}1`, 400, "validation_failed", ""},
		{"explicit vcpus 0", "POST", "/v1/vms", create + `,"vcpus":0}`, 400, "validation_failed", ""},
		{"explicit memory 0", "POST", "/v1/vms", create + `,"memory_mb":0}`, 400, "validation_failed", ""},
		{"explicit disk 0", "POST", "/v1/vms", create + `,"disk_gib":0}`, 400, "validation_failed", ""},
		{"vcpus 129", "POST", "/v1/vms", create + `,"vcpus":129}`, 400, "validation_failed", ""},
		{"cpu_limit 500", "POST", "/v1/vms", create + `,"cpu_limit":500}`, 400, "validation_failed", ""},
		{"cpu_limit negative", "PATCH", "/v1/vms/" + targetVM, `{"cpu_limit":-1}`, 400, "validation_failed", ""},
		{"vnc password too long", "PATCH", "/v1/vms/" + targetVM, `{"vnc_password":"123456789"}`, 400, "validation_failed", ""},
		{"vnc password empty", "PATCH", "/v1/vms/" + targetVM, `{"vnc_password":""}`, 400, "validation_failed", ""},
		{"patch unknown field", "PATCH", "/v1/vms/" + targetVM, `{"vnc_prot":5901}`, 400, "validation_failed", ""},
		{"null port with vnc off", "PATCH", "/v1/vms/" + targetVM, `{"vnc_enabled":false,"vnc_port":null}`, 400, "validation_failed", ""},
		{"stats", "GET", "/v1/vms/" + targetVM + "/stats", "", 200, "", ""},
		{"stats of no vm", "GET", "/v1/vms/nope/stats", "", 404, "not_found", ""},
		{"cursor traversal", "GET", "/v1/vms?cursor=..%2Fetc", "", 400, "validation_failed", ""},
		{"cursor uuid", "GET", "/v1/vms?cursor=6f1c2a4e-0d1b-4c55-9a43-6a0e4f7b2c11", "", 400, "validation_failed", ""},
		{"cursor name", "GET", "/v1/vms?cursor=vm-0", "", 200, "", ""},
		{"unknown path", "GET", "/v1/nothing", "", 404, "not_found", ""},
		{"unknown root", "GET", "/", "", 404, "not_found", ""},
		{"wrong method", "DELETE", "/v1/images", "", 405, "validation_failed", "GET, HEAD, POST"},
		{"wrong method on a vm", "PUT", "/v1/vms/" + targetVM, "", 405, "validation_failed", "DELETE, GET, HEAD, PATCH"},
	} {
		rec := z.do(t, tc.method, tc.target, []byte(tc.body))
		if rec.Code != tc.status {
			t.Errorf("%s: %s %s answered %d, want %d: %s", tc.name, tc.method, tc.target, rec.Code, tc.status, rec.Body)
			continue
		}
		if tc.code == "" {
			continue
		}
		env := checkEnvelope(t, rec)
		if env.Error.Code != tc.code {
			t.Errorf("%s: code %q, want %q (%s)", tc.name, env.Error.Code, tc.code, env.Error.Message)
		}
		if got := rec.Header().Get("Allow"); got != tc.allow {
			t.Errorf("%s: Allow %q, want %q", tc.name, got, tc.allow)
		}
		if strings.Contains(tc.name, "explicit") && !strings.Contains(env.Error.Message, "0") {
			t.Errorf("%s: message does not name the value: %s", tc.name, env.Error.Message)
		}
	}
}
