package standalone

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent"
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// The fuzzers of the standalone API and of task specs run against a real
// Host (temp dirs, QEMU's binaries installed, no VM running), one per fuzz
// target. Seeds are in testdata/fuzz/<FuzzName>/. Run one with e.g.
//
//	go test ./agent/standalone -run '^$' -fuzz FuzzAPICreate -fuzztime 60s

// apiFuzzer serves requests through the real handler, with a fresh control
// plane per input (an accepted create only queues a task: no runner).
type apiFuzzer struct {
	h   *agent.Host
	dir string
}

func newAPIFuzzer(f *testing.F) *apiFuzzer {
	return &apiFuzzer{h: newTestHost(f), dir: stateDir(f)}
}

// stateDir is where a fuzzer's control planes keep their state: in
// memory when /dev/shm exists, since each queued task is fsynced.
func stateDir(f *testing.F) string {
	dir, err := os.MkdirTemp("/dev/shm", "oxfuzz")
	if err != nil {
		return f.TempDir()
	}
	f.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (z *apiFuzzer) do(t *testing.T, method, target string, body []byte) *httptest.ResponseRecorder {
	os.Remove(filepath.Join(z.dir, "standalone.json"))
	a, _ := newTestAPI(t, z.h, z.dir)
	req := httptest.NewRequest(method, target, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	Guard(a.Handler(), DefaultLimits()).ServeHTTP(rec, req)
	return rec
}

// checkAnswer: 202 with a task of one of types, or a 4xx JSON error
// envelope with a known code whose status is the code's; never a 5xx.
// secrets must not appear in the answer.
func checkAnswer(t *testing.T, rec *httptest.ResponseRecorder, types []string, secrets []string) api.Task {
	t.Helper()
	body := rec.Body.String()
	for _, s := range secrets {
		if strings.Contains(body, s) {
			t.Fatalf("answer %d holds a secret of the request %q: %s", rec.Code, s, body)
		}
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("answer %d with Content-Type %q: %s", rec.Code, ct, body)
	}
	if rec.Code == http.StatusAccepted {
		var task api.Task
		if err := json.Unmarshal(rec.Body.Bytes(), &task); err != nil {
			t.Fatalf("202 body: %v: %s", err, body)
		}
		ok := false
		for _, typ := range types {
			ok = ok || task.Type == typ
		}
		if !ok || task.ID == "" || task.Status != api.TaskPending {
			t.Fatalf("202 with task %+v, want a pending task of %v", task, types)
		}
		return task
	}
	if rec.Code < 400 || rec.Code > 499 {
		t.Fatalf("status %d for bad input: %s", rec.Code, body)
	}
	checkEnvelope(t, rec)
	return api.Task{}
}

// checkEnvelope: a non-2xx answer is the JSON error envelope with a known
// code and a message; its status is the code's (429 is rate_limited's,
// 405 a wrong method's, with Allow).
func checkEnvelope(t *testing.T, rec *httptest.ResponseRecorder) api.ErrorEnvelope {
	t.Helper()
	body := rec.Body.String()
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("answer %d with Content-Type %q: %s", rec.Code, ct, body)
	}
	var env api.ErrorEnvelope
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		t.Fatalf("%d body is not an error envelope: %v: %s", rec.Code, err, body)
	}
	if !knownCode(env.Error.Code) || env.Error.Message == "" {
		t.Fatalf("%d with unknown code or no message: %+v", rec.Code, env.Error)
	}
	switch rec.Code {
	case http.StatusTooManyRequests:
	case http.StatusMethodNotAllowed:
		if rec.Header().Get("Allow") == "" || env.Error.Code != string(errcode.ValidationFailed) {
			t.Fatalf("405 without Allow or with code %s", env.Error.Code)
		}
	default:
		if rec.Code != StatusOf(errcode.Code(env.Error.Code)) {
			t.Fatalf("%d with code %s, whose status is %d", rec.Code, env.Error.Code, StatusOf(errcode.Code(env.Error.Code)))
		}
	}
	return env
}

// secretMark is what FuzzAPICreate's seeds put in user-data,
// network-config and the VNC password: no answer may hold it.
const secretMark = "s3cret"

// secretsOf returns secretMark when the body holds it in user-data,
// network-config or the VNC password and nowhere else (a name or an unknown key is echoed in
// answers, and may be).
func secretsOf(body []byte) []string {
	var m map[string]any
	if json.Unmarshal(body, &m) != nil {
		return nil
	}
	inSecret, elsewhere := false, false
	var walk func(v any, secret bool)
	walk = func(v any, secret bool) {
		switch v := v.(type) {
		case string:
			if strings.Contains(v, secretMark) {
				inSecret = inSecret || secret
				elsewhere = elsewhere || !secret
			}
		case []any:
			for _, e := range v {
				walk(e, secret)
			}
		case map[string]any:
			for k, e := range v {
				walk(k, false)
				walk(e, secret)
			}
		}
	}
	for k, v := range m {
		walk(k, false)
		walk(v, strings.EqualFold(k, "user_data") || strings.EqualFold(k, "network_config") || strings.EqualFold(k, "vnc_password"))
	}
	if inSecret && !elsewhere {
		return []string{secretMark}
	}
	return nil
}

func FuzzAPICreate(f *testing.F) {
	f.Add([]byte(`{"name":"web-1","image_url":"https://cloud-images.example/noble-amd64.img","arch":"amd64","vcpus":1,"memory_mb":256}`))
	f.Add([]byte(`{"name":"web-2","image_url":"http://127.0.0.1:8080/guest.qcow2","arch":"amd64","user_data":"#cloud-config\npassword: s3cret-marker\n"}`))
	z := newAPIFuzzer(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := z.do(t, "POST", "/v1/vms", body)
		if checkAnswer(t, rec, []string{api.TaskCreate}, secretsOf(body)).ID == "" {
			return
		}
		// Accepted: the body is a create the host validates.
		var c api.CreateVM
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			t.Fatalf("accepted a body that does not decode: %v", err)
		}
		if rest, _ := io.ReadAll(dec.Buffered()); len(bytes.TrimSpace(rest)) > 0 || dec.More() {
			t.Fatalf("accepted a body with data after its JSON object: %q", body)
		}
		var keys map[string]any
		json.Unmarshal(body, &keys)
		for _, k := range []string{"vcpus", "memory_mb", "disk_gib", "root_disk_size"} {
			if n, ok := keys[k].(float64); ok && n == 0 {
				t.Fatalf("accepted an explicit %s 0: %q", k, body)
			}
		}
		if err := z.h.ValidateCreate(&c); err != nil {
			t.Fatalf("accepted an invalid create: %v", err)
		}
	})
}

// FuzzAPIRoute sends any method to any path with no body: every answer
// outside 2xx is the JSON error envelope (routing's 404 and 405 included,
// 405 with Allow), never a 5xx, and a GET of /v1/vms with any query answers
// a page or validation_failed.
func FuzzAPIRoute(f *testing.F) {
	f.Add("GET", "/v1/nothing")
	f.Add("DELETE", "/v1/images")
	f.Add("PUT", "/v1/vms/vm-1")
	f.Add("GET", "/v1/vms?cursor=..%2Fetc&limit=2")
	f.Add("GET", "/v1/vms?cursor=vm-0")
	f.Add("POST", "/v1/vms/vm-1/cdroms/x")
	z := newAPIFuzzer(f)
	f.Fuzz(func(t *testing.T, method, target string) {
		u, err := url.ParseRequestURI(target)
		if err != nil || !validMethod(method) || u.Host != "" || strings.ContainsAny(target, " \t\r\n#") {
			t.Skip("not a request line")
		}
		rec := z.do(t, method, target, nil)
		if rec.Code >= 500 {
			t.Fatalf("%s %s: %d %s", method, target, rec.Code, rec.Body)
		}
		if rec.Code >= 300 {
			checkEnvelope(t, rec)
		}
		if method == "GET" && u.Path == "/v1/vms" && rec.Code == http.StatusOK {
			if c := u.Query().Get("cursor"); c != "" && (!api.IsName(c) || api.IsUUID(c)) {
				t.Fatalf("accepted the malformed cursor %q", c)
			}
		}
	})
}

// validMethod reports whether m is an HTTP token, as a request line needs.
func validMethod(m string) bool {
	if m == "" || len(m) > 16 {
		return false
	}
	for _, r := range m {
		if r < 'A' || r > 'Z' {
			return false
		}
	}
	return true
}

func FuzzAPIStop(f *testing.F) {
	f.Add([]byte(`{"force":true}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(``))
	z := newAPIFuzzer(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		checkAnswer(t, z.do(t, "POST", "/v1/vms/"+targetVM+"/stop", body), []string{api.TaskStop, api.TaskPoweroff}, nil)
	})
}

func FuzzAPIPullImage(f *testing.F) {
	f.Add([]byte(`{"url":"https://cloud-images.example/noble-amd64.img","pool":"default"}`))
	f.Add([]byte(`{"url":"https://cloud-images.example/a.img","sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}`))
	z := newAPIFuzzer(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		checkAnswer(t, z.do(t, "POST", "/v1/images", body), []string{api.TaskImagePull}, nil)
	})
}

// executeTypes are the task types FuzzExecute gives the Host. Only those
// that cannot start a VM: the host's one VM is stopped and stays so.
var executeTypes = []string{api.TaskCreate, api.TaskStop, api.TaskImagePull}

// FuzzExecute gives the Host's executor tasks with arbitrary specs. Image
// URLs must name the fuzzer's own loopback server, which answers 404 to
// everything: a spec naming anything else is skipped, so no input ever
// downloads from elsewhere, and no create gets as far as starting QEMU.
// Every task fails, fast, with a known code other than internal, and the
// host's VMs are as they were.
func FuzzExecute(f *testing.F) {
	f.Add(byte(0), []byte(`{"name":"web-1","image_url":"http://127.0.0.1:1/guest.qcow2","arch":"amd64","vcpus":1,"memory_mb":256}`))
	f.Add(byte(1), []byte(`{"force":true}`))
	f.Add(byte(2), []byte(`{"url":"http://127.0.0.1:1/guest.qcow2","pool":"default"}`))
	h := newTestHost(f)
	srv := httptest.NewServer(http.NotFoundHandler())
	f.Cleanup(srv.Close)
	stub := strings.TrimPrefix(srv.URL, "http://")
	f.Fuzz(func(t *testing.T, kind byte, spec []byte) {
		typ := executeTypes[int(kind)%len(executeTypes)]
		// Seeds name port 1; point them at the stub.
		spec = bytes.ReplaceAll(spec, []byte("127.0.0.1:1/"), []byte(stub+"/"))
		var image string
		switch typ {
		case api.TaskCreate:
			var c api.CreateVM
			if json.Unmarshal(spec, &c) == nil {
				image = c.ImageURL
			}
		case api.TaskImagePull:
			var p api.PullImage
			if json.Unmarshal(spec, &p) == nil {
				image = p.URL
			}
		}
		if image != "" {
			u, err := url.Parse(image)
			if err != nil || !strings.EqualFold(u.Scheme, "http") || u.Host != stub || u.User != nil {
				t.Skip("image URL not on the fuzzer's server")
			}
		}
		task := protocol.Task{ID: "8d3e8f0e-5a3f-4a47-b1c1-1d2f6f1a9b70", Type: typ, VMName: targetVM, VMUUID: targetVMUUID, Spec: spec}
		if typ == api.TaskCreate {
			task.VMName, task.VMUUID = "new-1", "0b7d0f4e-3c2a-4b8e-9d6f-2a1c5e7f9b31"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() {
			_, err := h.Execute(ctx, task, nil)
			done <- err
		}()
		var err error
		select {
		case err = <-done:
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not return within 30s", typ)
		}
		if ctx.Err() != nil {
			t.Fatalf("%s ran until its deadline: %v", typ, err)
		}
		if err == nil {
			t.Fatalf("%s succeeded with spec %q", typ, spec)
		}
		t.Logf("%s: %v", typ, err)
		if code := errcode.Of(err); code == errcode.Internal || !knownCode(string(code)) {
			t.Fatalf("%s failed with code %q: %v", typ, code, err)
		}
		vms := h.Engine().List()
		if len(vms) != 1 || vms[0].Spec.Name != targetVM || vms[0].Status != "stopped" {
			t.Fatalf("the host's VMs changed: %+v", vms)
		}
	})
}

// cpPaths are the agent protocol's endpoints FuzzControlPlane posts to;
// %s is a task id.
var cpPaths = []string{protocol.PathRegister, protocol.PathLease, protocol.PathHeartbeat,
	protocol.PathTaskPrefix + "%s/progress", protocol.PathTaskPrefix + "%s/complete"}

// FuzzControlPlane posts arbitrary bodies to the in-process control plane,
// each twice (agents retry). A control plane with one leased create task
// and one pending task answers 200 or a 4xx,
// never panics, and a retried completion is answered as the first was.
// "LEASE" in a body is the leased task's lease id.
func FuzzControlPlane(f *testing.F) {
	f.Add(byte(4), []byte(`{"protocol_version":1,"node":"node-1","lease_id":"LEASE","attempt":1,"status":"success","finished_at":"2026-01-02T03:04:05Z"}`))
	f.Add(byte(3), []byte(`{"protocol_version":1,"node":"node-1","lease_id":"LEASE","progress":{"phase":"download","done":1,"total":2}}`))
	dir := stateDir(f)
	f.Fuzz(func(t *testing.T, sel byte, body []byte) {
		os.Remove(filepath.Join(dir, "standalone.json"))
		cp, err := NewControlPlane(filepath.Join(dir, "standalone.json"), testToken, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		created, err := cp.Enqueue(api.TaskCreate, "web-1", "0b7d0f4e-3c2a-4b8e-9d6f-2a1c5e7f9b31", api.CreateVM{Name: "web-1", UserData: "#cloud-config\n"})
		if err != nil {
			t.Fatal(err)
		}
		leased, _ := cp.Server().Lease(context.Background(), protocol.LeaseRequest{Max: 1})
		if len(leased.Tasks) != 1 || leased.Tasks[0].ID != created.ID {
			t.Fatalf("lease: %+v", leased)
		}
		if _, err := cp.Enqueue(api.TaskStart, targetVM, targetVMUUID, nil); err != nil {
			t.Fatal(err)
		}
		path := cpPaths[int(sel)%len(cpPaths)]
		if strings.Contains(path, "%s") {
			path = fmt.Sprintf(path, created.ID)
		}
		body = bytes.ReplaceAll(body, []byte("LEASE"), []byte(leased.Tasks[0].LeaseID))
		// A lease with nothing to lease returns at once: its request's
		// context is over.
		gone, cancel := context.WithCancel(context.Background())
		cancel()
		var codes [2]int
		for i := range codes {
			req := httptest.NewRequestWithContext(gone, "POST", path, bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+testToken)
			rec := httptest.NewRecorder()
			cp.ServeHTTP(rec, req)
			codes[i] = rec.Code
			switch rec.Code {
			case http.StatusOK, http.StatusBadRequest, http.StatusNotFound, http.StatusConflict:
			default:
				t.Fatalf("POST %s: %d %s", path, rec.Code, rec.Body)
			}
		}
		if strings.HasSuffix(path, "/complete") && codes[0] == http.StatusOK && codes[1] != http.StatusOK {
			t.Fatalf("a retried completion got %d after 200", codes[1])
		}
		if task, _ := cp.Task(context.Background(), created.ID); task.Status != api.TaskRunning {
			if full, _ := cp.Server().Task(context.Background(), created.ID); full.Spec != nil {
				t.Fatalf("task %s is %s and still holds its spec", task.ID, task.Status)
			}
		}
	})
}
