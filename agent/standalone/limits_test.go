package standalone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// serve runs h behind NewServer on a LimitListener on loopback and returns
// the listener (its address, and its hooks for tests).
func serve(t *testing.T, h http.Handler, l Limits, tlsConfig *tls.Config) *limitListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(h, l, zaptest.NewLogger(t))
	ll := LimitListener(ln, l.MaxConns, tlsConfig).(*limitListener)
	go srv.Serve(ll)
	t.Cleanup(func() { srv.Close() })
	return ll
}

// waitClosed reads c until the server closes it, and fails the test if
// that takes longer than the guard.
func waitClosed(t *testing.T, c net.Conn, guard time.Duration) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(guard))
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the server kept the connection open for %s", guard)
	}
	return b
}

// TestSlowlorisHeader: a client sending its header a byte at a time is cut
// when ReadHeaderTimeout has passed since the header began, though it
// never stops sending.
func TestSlowlorisHeader(t *testing.T) {
	l := DefaultLimits()
	l.ReadHeaderTimeout = 300 * time.Millisecond
	ll := serve(t, http.NotFoundHandler(), l, nil)
	c, err := net.Dial("tcp", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		header := "GET /v1/vms HTTP/1.1\r\nHost: x\r\nX-Slow: " + strings.Repeat("a", 1<<20)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if _, err := c.Write([]byte{header[i]}); err != nil {
				return
			}
		}
	}()
	// net/http may answer 400 before closing; what matters is the close.
	waitClosed(t, c, 10*time.Second)
}

// TestSlowBody: a create whose body stalls after its header is answered
// 400 validation_failed when BodyTimeout has passed, and the connection is
// closed.
func TestSlowBody(t *testing.T) {
	h := newTestHost(t)
	a, _ := newTestAPI(t, h, t.TempDir())
	l := DefaultLimits()
	l.BodyTimeout = 300 * time.Millisecond
	ll := serve(t, a.Handler(), l, nil)
	c, err := net.Dial("tcp", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer to a stalled body: %v", err)
	}
	env := decodeEnvelope(t, resp)
	if resp.StatusCode != 400 || env.Error.Code != "validation_failed" || !strings.Contains(env.Error.Message, "not received in time") {
		t.Fatalf("stalled body: %d %+v", resp.StatusCode, env)
	}
	waitClosed(t, c, 10*time.Second)
}

func decodeEnvelope(t *testing.T, resp *http.Response) api.ErrorEnvelope {
	t.Helper()
	defer resp.Body.Close()
	var env api.ErrorEnvelope
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &env); err != nil {
		t.Fatalf("%d answer is not an error envelope: %q", resp.StatusCode, b)
	}
	return env
}

// TestOversized: every body of the API and of the control plane has a
// bound, answered 400 validation_failed; a header over MaxHeaderBytes is
// answered 431.
func TestOversized(t *testing.T) {
	h := newTestHost(t)
	a, cp := newTestAPI(t, h, t.TempDir())
	mux := http.NewServeMux()
	mux.Handle("/v1/agent/", cp)
	mux.Handle("/", a.Handler())
	ll := serve(t, mux, DefaultLimits(), nil)
	base := "http://" + ll.Addr().String()
	for _, tc := range []struct {
		path  string
		size  int
		token bool
	}{
		{"/v1/vms", maxBody + 1, false},
		{"/v1/vms/" + targetVM + "/stop", maxStopBody + 1, false},
		{"/v1/images", maxPullBody + 1, false},
		{protocol.PathHeartbeat, 8<<20 + 1, true},
		{protocol.PathLease, 8<<20 + 1, true},
	} {
		// A JSON string that never ends: only the bound stops it.
		body := append([]byte(`{"name":"`), bytes.Repeat([]byte("a"), tc.size)...)
		req, _ := http.NewRequest("POST", base+tc.path, bytes.NewReader(body))
		if tc.token {
			req.Header.Set("Authorization", "Bearer "+testToken)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("POST %s: %v", tc.path, err)
		}
		env := decodeEnvelope(t, resp)
		if resp.StatusCode != 400 || env.Error.Code != "validation_failed" {
			t.Errorf("POST %s with %d bytes: %d %+v", tc.path, len(body), resp.StatusCode, env)
		}
	}
	req, _ := http.NewRequest("GET", base+"/v1/vms", nil)
	req.Header.Set("X-Big", strings.Repeat("a", DefaultLimits().MaxHeaderBytes+8192))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("oversized header: %d", resp.StatusCode)
	}
}

// TestConnectionLimit: with MaxConns open connections, one more is
// answered 503 with Retry-After and closed; once one closes, a new one is
// served.
func TestConnectionLimit(t *testing.T) {
	l := DefaultLimits()
	l.MaxConns = 2
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	ll := serve(t, ok, l, nil)
	released := make(chan struct{}, 8)
	ll.onRelease = func() { released <- struct{}{} }
	addr := ll.Addr().String()

	var held []net.Conn
	for range l.MaxConns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// A served request proves the connection holds a slot.
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("held connection: %v %v", resp, err)
		}
		resp.Body.Close()
		held = append(held, c)
	}

	get := func() *http.Response {
		t.Helper()
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := client.Get("http://" + addr + "/")
		if err != nil {
			t.Fatalf("GET over the limit: %v", err)
		}
		return resp
	}
	resp := get()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("over the limit: %d Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	if env := decodeEnvelope(t, resp); !knownCode(env.Error.Code) {
		t.Fatalf("503 envelope: %+v", env)
	}

	held[0].Close()
	<-released
	resp = get()
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok" {
		t.Fatalf("after a slot freed: %d %q", resp.StatusCode, b)
	}
}

// TestStalledReader: a client that stops reading is cut once a write has
// waited WriteTimeout; the handler's write fails.
func TestStalledReader(t *testing.T) {
	l := DefaultLimits()
	l.WriteTimeout = 300 * time.Millisecond
	werr := make(chan error, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		for {
			if _, err := w.Write(chunk); err != nil {
				werr <- err
				return
			}
		}
	})
	ll := serve(t, h, l, nil)
	c, err := net.Dial("tcp", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /console HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case err := <-werr:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Logf("write error: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the server kept writing to a client that does not read")
	}
}

// TestLongHandler: the body and write deadlines do not cut a handler that
// waits longer than both before answering (a lease's long-poll, a sync
// op): its request's context stays alive and its answer arrives, whether
// the request had a body (read by the handler) or none.
func TestLongHandler(t *testing.T) {
	l := DefaultLimits()
	l.BodyTimeout = 100 * time.Millisecond
	l.WriteTimeout = 100 * time.Millisecond
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" {
			io.ReadAll(r.Body)
		}
		select {
		case <-time.After(5 * l.BodyTimeout):
		case <-r.Context().Done():
			http.Error(w, "context ended: "+context.Cause(r.Context()).Error(), 500)
			return
		}
		io.WriteString(w, "done")
	})
	ll := serve(t, h, l, nil)
	for _, method := range []string{"GET", "POST"} {
		req, _ := http.NewRequest(method, "http://"+ll.Addr().String()+"/", nil)
		if method == "POST" {
			req, _ = http.NewRequest(method, "http://"+ll.Addr().String()+"/", strings.NewReader(`{"wait_seconds":30}`))
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "done" {
			t.Fatalf("%s: %d %q", method, resp.StatusCode, b)
		}
	}
}

// TestPendingLimits: past MaxPendingCreates unfinished creates, or
// MaxPendingTasks unfinished tasks, an op that queues a task is answered
// 429 with Retry-After; a finished task makes room.
func TestPendingLimits(t *testing.T) {
	h := newTestHost(t)
	a, cp := newTestAPI(t, h, t.TempDir())
	cp.SetLimits(3, 2)
	ll := serve(t, a.Handler(), DefaultLimits(), nil)
	base := "http://" + ll.Addr().String()
	post := func(path, body string) (int, http.Header, api.ErrorEnvelope) {
		t.Helper()
		resp, err := http.Post(base+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var env api.ErrorEnvelope
		json.NewDecoder(resp.Body).Decode(&env)
		return resp.StatusCode, resp.Header, env
	}
	create := func(name string) string {
		return `{"name":"` + name + `","image_url":"http://127.0.0.1:1/guest.qcow2","arch":"amd64","vcpus":1,"memory_mb":256}`
	}
	for _, tc := range []struct {
		path, body string
		want       int
	}{
		{"/v1/vms", create("a-1"), 202},
		{"/v1/vms", create("a-2"), 202},
		{"/v1/vms", create("a-3"), 429}, // creates
		{"/v1/vms/" + targetVM + "/stop", "", 202},
		{"/v1/vms/" + targetVM + "/start", "", 429}, // tasks
		{"/v1/vms/" + targetVM + "/pause", "", 429},
		{"/v1/images", `{"url":"http://127.0.0.1:1/guest.qcow2"}`, 429},
	} {
		code, hdr, env := post(tc.path, tc.body)
		if code != tc.want {
			t.Fatalf("POST %s: %d %+v, want %d", tc.path, code, env, tc.want)
		}
		if code == 429 && (hdr.Get("Retry-After") == "" || !knownCode(env.Error.Code) || env.Error.Message == "") {
			t.Fatalf("POST %s: 429 with Retry-After %q and %+v", tc.path, hdr.Get("Retry-After"), env)
		}
	}
	// One create finishes: a create fits again.
	leased, _ := cp.Server().Lease(context.Background(), protocol.LeaseRequest{Max: 1})
	if _, err := cp.Server().Complete(context.Background(), leased.Tasks[0].ID, protocol.CompleteRequest{Status: api.TaskFailed, Error: &api.Error{Code: "image_download_failed", Message: "404"}}); err != nil {
		t.Fatal(err)
	}
	if code, _, env := post("/v1/vms", create("a-3")); code != 202 {
		t.Fatalf("create after one finished: %d %+v", code, env)
	}
}

// TestCompleteStatus: a completion must say success, failed or cancelled;
// anything else is refused, and retrying it does not break the task.
func TestCompleteStatus(t *testing.T) {
	cp, err := NewControlPlane(filepath.Join(t.TempDir(), "standalone.json"), testToken, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	task, _ := cp.Enqueue(api.TaskStart, targetVM, targetVMUUID, nil)
	cp.Server().Lease(context.Background(), protocol.LeaseRequest{Max: 1})
	for range 2 {
		if _, err := cp.Server().Complete(context.Background(), task.ID, protocol.CompleteRequest{Status: "done"}); !errors.Is(err, cpserver.ErrBadStatus) {
			t.Fatalf("complete with status done: %v", err)
		}
	}
	if _, err := cp.Server().Complete(context.Background(), task.ID, protocol.CompleteRequest{Status: api.TaskSuccess}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if got, err := cp.Wait(ctx, task.ID); err != nil || got.Status != api.TaskSuccess {
		t.Fatalf("task after completion: %+v %v", got, err)
	}
}

// TestLocalClient: the agent's protocol client calls the in-process
// control plane: register, a lease woken at once by a queued task, a
// completion that ends the API's wait; refusals are the errors the HTTP
// client gives for the same answers, and every call is observed.
func TestLocalClient(t *testing.T) {
	dir := t.TempDir()
	cp, err := NewControlPlane(filepath.Join(dir, "standalone.json"), testToken, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var paths []string
	c := cp.LocalClient("node-1", func(path string, _ time.Duration, _ error) {
		mu.Lock()
		paths = append(paths, path)
		mu.Unlock()
	})
	ctx := context.Background()
	if _, err := c.Register(ctx, protocol.NodeInfo{Name: "node-1"}); err != nil {
		t.Fatal(err)
	}
	leased := make(chan *protocol.LeaseResponse, 1)
	go func() {
		got, err := c.Lease(ctx, time.Minute, 1)
		if err != nil {
			t.Error(err)
		}
		leased <- got
	}()
	task, _ := cp.Enqueue(api.TaskPause, targetVM, targetVMUUID, nil)
	got := <-leased
	if got == nil || len(got.Tasks) != 1 || got.Tasks[0].ID != task.ID {
		t.Fatalf("lease: %+v", got)
	}
	waited := make(chan api.Task, 1)
	go func() {
		done, err := cp.Wait(ctx, task.ID)
		if err != nil {
			t.Error(err)
		}
		waited <- done
	}()
	vm := &api.VM{Name: targetVM, UUID: targetVMUUID, Status: api.StatusPaused}
	if err := c.Complete(ctx, task.ID, protocol.CompleteRequest{LeaseID: got.Tasks[0].LeaseID, Status: api.TaskSuccess, VM: vm}); err != nil {
		t.Fatal(err)
	}
	if done := <-waited; done.Status != api.TaskSuccess || done.Result == nil || done.Result.Status != api.StatusPaused {
		t.Fatalf("the API's wait after completion: %+v", done)
	}

	// Refusals, as protocol.Client would give them.
	var herr *protocol.HTTPError
	_, err = c.Progress(ctx, "no-such-task", "l", nil)
	if !errors.As(err, &herr) || herr.StatusCode != http.StatusNotFound || herr.Code != "not_found" || protocol.IsRetryable(err) {
		t.Errorf("progress of an unknown task: %v", err)
	}
	err = c.Complete(ctx, task.ID, protocol.CompleteRequest{Status: "bogus"})
	if !errors.As(err, &herr) || herr.StatusCode != http.StatusBadRequest || protocol.IsRetryable(err) {
		t.Errorf("completion with a bad status: %v", err)
	}
	cp.srv.Store = unavailable{cp.srv.Store}
	_, err = c.Heartbeat(ctx, protocol.HeartbeatRequest{State: protocol.NodeReady})
	if !protocol.IsRetryable(err) || protocol.RetryAfter(err) != cpserver.RetryAfterSeconds*time.Second {
		t.Errorf("heartbeat to a store without quorum: %v (retry after %v)", err, protocol.RetryAfter(err))
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{protocol.PathRegister, protocol.PathLease, protocol.CompletePath(task.ID), protocol.ProgressPath("no-such-task"),
		protocol.CompletePath(task.ID), protocol.PathHeartbeat}
	if fmt.Sprint(paths) != fmt.Sprint(want) {
		t.Errorf("observed %v, want %v", paths, want)
	}
}

// unavailable is a store that lost its quorum: every node write fails.
type unavailable struct{ cpserver.Store }

func (unavailable) PutNode(context.Context, cpserver.Node) error {
	return fmt.Errorf("etcd: %w", cpserver.ErrUnavailable)
}

// testCert writes a self-signed certificate for 127.0.0.1 and its key.
func testCert(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "otherix-agent"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestCheckListen(t *testing.T) {
	dir := t.TempDir()
	cert, key, _ := testCert(t, dir)
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte(testToken+"\n"), 0o600)
	open := filepath.Join(dir, "open-token")
	os.WriteFile(open, []byte(testToken+"\n"), 0o644)
	short := filepath.Join(dir, "short-token")
	os.WriteFile(short, []byte("abc\n"), 0o600)
	for _, tc := range []struct {
		addr, cert, key, token string
		want                   string // error substring; "" = ok
		tls, auth              bool
	}{
		{addr: "127.0.0.1:7480"},
		{addr: "[::1]:7480"},
		{addr: "localhost:0"},
		{addr: "127.0.0.2:7480"},
		{addr: "127.0.0.1:7480", cert: cert, key: key, token: token, tls: true, auth: true},
		{addr: "127.0.0.1:7480", token: token, auth: true},
		{addr: "0.0.0.0:7480", want: "listen.api \"0.0.0.0:7480\" is not a loopback address"},
		{addr: ":7480", want: "not a loopback address"},
		{addr: "[::]:7480", want: "not a loopback address"},
		{addr: "192.0.2.10:7480", token: token, want: "listen.tls_cert"},
		{addr: "myhost.example:7480", cert: cert, key: key, want: "listen.token_file"},
		{addr: "0.0.0.0:7480", cert: cert, key: key, token: token, tls: true, auth: true},
		{addr: "0.0.0.0:7480", cert: cert, token: token, want: "set both or neither"},
		{addr: "0.0.0.0:7480", cert: key, key: cert, token: token, want: "listen.tls_cert/listen.tls_key"},
		{addr: "0.0.0.0:7480", cert: cert, key: key, token: open, want: "chmod 600"},
		{addr: "0.0.0.0:7480", cert: cert, key: key, token: short, want: "at least 16"},
		{addr: "0.0.0.0:7480", cert: cert, key: key, token: filepath.Join(dir, "none"), want: "listen.token_file"},
		{addr: "7480", want: "listen.api"},
	} {
		sec, err := CheckListen(tc.addr, tc.cert, tc.key, tc.token)
		if tc.want != "" {
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("CheckListen(%q, %q, %q, %q) = %v, want an error with %q", tc.addr, tc.cert, tc.key, tc.token, err, tc.want)
			}
			continue
		}
		if err != nil {
			t.Errorf("CheckListen(%q, %q, %q, %q): %v", tc.addr, tc.cert, tc.key, tc.token, err)
			continue
		}
		if (sec.TLS != nil) != tc.tls || (sec.Token == testToken) != tc.auth {
			t.Errorf("CheckListen(%q): TLS %v token %q", tc.addr, sec.TLS != nil, sec.Token)
		}
	}
}

// TestTLSAndToken: the API beyond loopback: HTTPS only, 401 without the
// token, served with it; the agent protocol keeps its own token; a
// connection over the limit gets its 503 over TLS too.
func TestTLSAndToken(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := testCert(t, dir)
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte(testToken+"\n"), 0o600)
	sec, err := CheckListen("0.0.0.0:7480", certFile, keyFile, tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	h := newTestHost(t)
	a, cp := newTestAPI(t, h, t.TempDir())
	cp.Server().Token = "control-plane-token-0123456789"
	mux := http.NewServeMux()
	mux.Handle("/v1/agent/", cp)
	mux.Handle("/", a.Handler())
	l := DefaultLimits()
	l.MaxConns = 1
	ll := serve(t, RequireToken(mux, sec.Token), l, sec.TLS)
	released := make(chan struct{}, 8)
	ll.onRelease = func() { released <- struct{}{} }
	base := "https://" + ll.Addr().String()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	do := func(method, path, auth string) (*http.Response, error) {
		req, _ := http.NewRequest(method, base+path, strings.NewReader("{}"))
		if auth != "" {
			req.Header.Set("Authorization", "Bearer "+auth)
		}
		resp, err := client.Do(req)
		if err == nil {
			defer func() { <-released }() // the connection is closed after each request
		}
		return resp, err
	}
	for _, tc := range []struct {
		method, path, auth string
		want               int
	}{
		{"GET", "/v1/vms", "", 401},
		{"GET", "/v1/vms", "wrong-token-0123456789", 401},
		{"GET", "/v1/vms", cp.Server().Token, 401},
		{"GET", "/v1/vms", testToken, 200},
		{"GET", "/v1/agent/../vms", "", 401},
		{"POST", protocol.PathHeartbeat, testToken, 401},
		{"POST", protocol.PathHeartbeat, cp.Server().Token, 200},
	} {
		resp, err := do(tc.method, tc.path, tc.auth)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s with token %q: %d, want %d", tc.method, tc.path, tc.auth, resp.StatusCode, tc.want)
		}
	}
	// Plain HTTP gets nothing useful from the TLS listener.
	if resp, err := http.Get("http://" + ll.Addr().String() + "/v1/vms"); err == nil {
		resp.Body.Close()
		<-released
		if resp.StatusCode == 200 {
			t.Fatal("plain HTTP served")
		}
	}
	// One connection held: the next gets 503 over TLS.
	c, err := tls.Dial("tcp", ll.Addr().String(), &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", testToken)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("held connection: %v %v", resp, err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("GET", base+"/v1/vms", nil)
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("over the limit over TLS: %d", resp.StatusCode)
	}
}
