package protocol_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
)

func writeToken(t *testing.T, token string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token+"\n"), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // umask-proof
		t.Fatal(err)
	}
	return p
}

func newClient(t *testing.T, url, tokenFile string) *protocol.Client {
	t.Helper()
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: url, Node: "node-1", TokenFile: tokenFile, AgentVersion: "1.2.3", Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestTokenFileModeRefused(t *testing.T) {
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o660} {
		p := writeToken(t, "secret", mode)
		_, err := protocol.NewClient(protocol.ClientConfig{BaseURL: "https://cp.invalid", Node: "n", TokenFile: p})
		if !errors.Is(err, protocol.ErrInsecureTokenFile) {
			t.Errorf("mode %04o: got %v, want ErrInsecureTokenFile", mode, err)
			continue
		}
		if !strings.Contains(err.Error(), "chmod 600") || strings.Contains(err.Error(), "secret") {
			t.Errorf("mode %04o: error %q should say how to fix and never show the token", mode, err)
		}
	}
	for _, mode := range []os.FileMode{0o600, 0o400} {
		p := writeToken(t, "secret", mode)
		if _, err := protocol.NewClient(protocol.ClientConfig{BaseURL: "https://cp.invalid", Node: "n", TokenFile: p}); err != nil {
			t.Errorf("mode %04o: %v", mode, err)
		}
	}
}

func TestConfigRefusals(t *testing.T) {
	tok := writeToken(t, "secret", 0o600)
	for _, tc := range []struct {
		name string
		cfg  protocol.ClientConfig
	}{
		{"plain http to a remote host", protocol.ClientConfig{BaseURL: "http://cp.example", Node: "n", TokenFile: tok}},
		{"odd scheme", protocol.ClientConfig{BaseURL: "ftp://cp.example", Node: "n", TokenFile: tok}},
		{"no node", protocol.ClientConfig{BaseURL: "https://cp.example", TokenFile: tok}},
		{"no token file", protocol.ClientConfig{BaseURL: "https://cp.example", Node: "n"}},
		{"missing token file", protocol.ClientConfig{BaseURL: "https://cp.example", Node: "n", TokenFile: tok + ".missing"}},
		{"empty token", protocol.ClientConfig{BaseURL: "https://cp.example", Node: "n", TokenFile: writeToken(t, "  ", 0o600)}},
		{"cert without key", protocol.ClientConfig{BaseURL: "https://cp.example", Node: "n", TokenFile: tok, CertFile: tok}},
	} {
		if _, err := protocol.NewClient(tc.cfg); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	for _, u := range []string{"http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"} {
		if _, err := protocol.NewClient(protocol.ClientConfig{BaseURL: u, Node: "n", TokenFile: tok}); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
}

// writeCA writes the server's certificate as a PEM CA file.
func writeCA(t *testing.T, ts *httptest.Server) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ca.pem")
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// otherCA writes a freshly made self-signed CA that signed nothing the
// test server shows (httptest servers all share one certificate).
func otherCA(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "other test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "other-ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestTLSWithCAFile(t *testing.T) {
	cp := &cptest.Server{Token: "secret"}
	ts := httptest.NewTLSServer(cp)
	defer ts.Close()
	tok := writeToken(t, "secret", 0o600)
	ctx := context.Background()

	good, err := protocol.NewClient(protocol.ClientConfig{BaseURL: ts.URL, Node: "n", TokenFile: tok, CAFile: writeCA(t, ts)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := good.Register(ctx, protocol.NodeInfo{Name: "n"}); err != nil {
		t.Fatalf("register over TLS with the right CA: %v", err)
	}

	wrong, err := protocol.NewClient(protocol.ClientConfig{BaseURL: ts.URL, Node: "n", TokenFile: tok, CAFile: otherCA(t)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = wrong.Register(ctx, protocol.NodeInfo{Name: "n"})
	if err == nil {
		t.Fatal("register with the wrong CA succeeded")
	}
	if protocol.IsRetryable(err) {
		t.Errorf("untrusted certificate classified retryable: %v", err)
	}
	if got := len(cp.Registrations()); got != 1 {
		t.Errorf("control plane saw %d registrations, want 1", got)
	}

	badCA := writeToken(t, "not a pem", 0o600)
	if _, err := protocol.NewClient(protocol.ClientConfig{BaseURL: ts.URL, Node: "n", TokenFile: tok, CAFile: badCA}); err == nil {
		t.Error("a CA file without a certificate was accepted")
	}
}

func TestClassification(t *testing.T) {
	cp := &cptest.Server{Token: "secret"}
	ts := httptest.NewServer(cp)
	defer ts.Close()
	c := newClient(t, ts.URL, writeToken(t, "secret", 0o600))
	ctx := context.Background()

	for _, tc := range []struct {
		name       string
		fault      cptest.Fault
		retryable  bool
		retryAfter time.Duration
		status     int
	}{
		{"503", cptest.Fault{Kind: cptest.FaultStatus, Status: 503, Times: 1}, true, 0, 503},
		{"500", cptest.Fault{Kind: cptest.FaultStatus, Status: 500, Times: 1}, true, 0, 500},
		{"429 retry-after seconds", cptest.Fault{Kind: cptest.FaultStatus, Status: 429, RetryAfter: "7", Times: 1}, true, 7 * time.Second, 429},
		{"400", cptest.Fault{Kind: cptest.FaultStatus, Status: 400, Times: 1}, false, 0, 400},
		{"401 retry-after", cptest.Fault{Kind: cptest.FaultStatus, Status: 401, RetryAfter: "30", Times: 1}, false, 30 * time.Second, 401},
		{"409", cptest.Fault{Kind: cptest.FaultStatus, Status: 409, Times: 1}, false, 0, 409},
		{"dropped connection", cptest.Fault{Kind: cptest.FaultDrop, Times: 1}, true, 0, 0},
	} {
		cp.AddFault(tc.fault)
		_, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{})
		if err == nil {
			t.Errorf("%s: no error", tc.name)
			continue
		}
		if got := protocol.IsRetryable(err); got != tc.retryable {
			t.Errorf("%s: retryable = %v, want %v (%v)", tc.name, got, tc.retryable, err)
		}
		if got := protocol.RetryAfter(err); got != tc.retryAfter {
			t.Errorf("%s: retry after = %v, want %v", tc.name, got, tc.retryAfter)
		}
		var herr *protocol.HTTPError
		if tc.status != 0 && (!errors.As(err, &herr) || herr.StatusCode != tc.status || herr.Code != "injected") {
			t.Errorf("%s: got %#v, want an HTTPError %d with the answer's code", tc.name, err, tc.status)
		}
	}
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil {
		t.Fatalf("after the faults: %v", err)
	}

	// Retry-After as an HTTP date.
	cp.AddFault(cptest.Fault{Kind: cptest.FaultStatus, Status: 503, RetryAfter: time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat), Times: 1})
	_, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{})
	if ra := protocol.RetryAfter(err); ra < 80*time.Second || ra > 91*time.Second {
		t.Errorf("retry-after date: got %v, want about 90s", ra)
	}

	// Unreachable: nothing listens.
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := dead.URL
	dead.Close()
	_, err = newClient(t, deadURL, writeToken(t, "secret", 0o600)).Heartbeat(ctx, protocol.HeartbeatRequest{})
	if !protocol.IsRetryable(err) {
		t.Errorf("unreachable: got %v, want retryable", err)
	}
	var r interface {
		Retryable() bool
		Unwrap() error
	}
	if !errors.As(err, &r) || r.Unwrap() == nil {
		t.Errorf("unreachable: %T has no Retryable/Unwrap", err)
	}

	// A cancelled context is not a retryable failure: it is the caller's.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.Heartbeat(cctx, protocol.HeartbeatRequest{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled ctx: got %v", err)
	}
}

// The largest answer the agent reads is MaxAnswerBytes (after gzip); a
// larger 2xx answer, or one that is not JSON of the answer's type, is a
// failed request: retryable, with ErrMalformedAnswer in its chain. A 2xx
// to a completion acknowledges it whatever its body; an empty body reads
// as {}.
func TestAnswerLimitsAndMalformedAnswers(t *testing.T) {
	cp := &cptest.Server{Token: "secret"}
	ts := httptest.NewServer(cp)
	defer ts.Close()
	c := newClient(t, ts.URL, writeToken(t, "secret", 0o600))
	ctx := context.Background()
	// A valid answer of exactly n bytes: the map padded with spaces.
	padded := func(n int) []byte {
		b := []byte(`{"interval_seconds": 7, "desired": {"u1": "running"}}`)
		return append(b, strings.Repeat(" ", n-len(b))...)
	}

	cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultBody, Body: padded(protocol.MaxAnswerBytes), Times: 1})
	resp, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{})
	if err != nil || resp.IntervalSeconds != 7 || resp.Desired["u1"] != api.PhaseRunning {
		t.Errorf("answer of exactly MaxAnswerBytes: %+v, %v", resp, err)
	}
	for _, tc := range []struct {
		name string
		body []byte
		want string
	}{
		{"one byte too large", padded(protocol.MaxAnswerBytes + 1), "larger than 16777216 bytes"},
		{"not JSON", []byte("<html>proxy login</html>"), "invalid character"},
		{"cut short", []byte(`{"desired": {"u1": "runn`), "unexpected end of JSON input"},
		{"wrong type", []byte(`{"desired": ["u1"]}`), "cannot unmarshal array"},
	} {
		cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultBody, Body: tc.body, Times: 1})
		_, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{})
		if !errors.Is(err, protocol.ErrMalformedAnswer) || !protocol.IsRetryable(err) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want a retryable ErrMalformedAnswer saying %q", tc.name, err, tc.want)
		}
	}
	// The same for a lease answer.
	cp.AddFault(cptest.Fault{Endpoint: cptest.Lease, Kind: cptest.FaultBody, Body: []byte(`{"tasks": {}}`), Times: 1})
	if _, err := c.Lease(ctx, 0, 1); !errors.Is(err, protocol.ErrMalformedAnswer) || !protocol.IsRetryable(err) {
		t.Errorf("malformed lease answer: got %v", err)
	}

	cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultBody, Body: nil, Times: 1})
	if resp, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil || resp.Desired != nil {
		t.Errorf("empty 2xx body: %+v, %v; want {} (no desired map)", resp, err)
	}
	cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultBody, Body: []byte("garbage"), Times: 1})
	if err := c.Complete(ctx, "t1", protocol.CompleteRequest{Status: api.TaskSuccess}); err != nil {
		t.Errorf("a 2xx to a completion with a garbled body: %v, want acknowledged", err)
	}
}

func TestBearerTokenAndRotation(t *testing.T) {
	cp := &cptest.Server{Token: "old"}
	ts := httptest.NewServer(cp)
	defer ts.Close()
	p := writeToken(t, "old", 0o600)
	c := newClient(t, ts.URL, p)
	ctx := context.Background()
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil {
		t.Fatal(err)
	}
	cp.SetToken("new")
	_, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{})
	if !protocol.IsAuth(err) || protocol.IsRetryable(err) {
		t.Fatalf("wrong token: got %v, want a non-retryable auth error", err)
	}
	// Rotate: write a new file and rename it over the old one.
	np := p + ".new"
	if err := os.WriteFile(np, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(np, p); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	// A rotation that loosens the mode is refused at the next request.
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte("newer"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); !errors.Is(err, protocol.ErrInsecureTokenFile) {
		t.Fatalf("loosened token file: got %v", err)
	}
}

func TestWireAndCompression(t *testing.T) {
	var ua, path string
	var seen http.Header
	cp := &cptest.Server{Token: "secret"}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ua, path, seen = r.UserAgent(), r.URL.EscapedPath(), r.Header.Clone()
		cp.ServeHTTP(w, r)
	}))
	defer ts.Close()
	c := newClient(t, ts.URL, writeToken(t, "secret", 0o600))
	ctx := context.Background()

	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("otherix-agent/1.2.3 (protocol %d;", protocol.Version); !strings.HasPrefix(ua, want) {
		t.Errorf("user agent %q, want prefix %q", ua, want)
	}
	if seen.Get("Content-Encoding") != "" {
		t.Error("a small heartbeat was compressed")
	}
	hb := protocol.HeartbeatRequest{}
	for i := range 100 {
		hb.VMs = append(hb.VMs, protocol.VMStatus{Name: fmt.Sprintf("vm-%d", i), UUID: fmt.Sprintf("uuid-%d", i), Status: api.StatusRunning, Pool: "default", Node: "node-1"})
	}
	if _, err := c.Heartbeat(ctx, hb); err != nil {
		t.Fatal(err)
	}
	if seen.Get("Content-Encoding") != "gzip" {
		t.Error("a large heartbeat was not compressed")
	}
	hbs := cp.Heartbeats()
	if got := hbs[len(hbs)-1]; len(got.VMs) != 100 || got.VMs[99].UUID != "uuid-99" || got.Node != "node-1" || got.ProtocolVersion != protocol.Version {
		t.Errorf("decoded heartbeat: %d vms, node %q, version %d", len(got.VMs), got.Node, got.ProtocolVersion)
	}
	wire, gz := cp.WireBytes(cptest.Heartbeat)
	if gz != 1 || wire <= 0 {
		t.Errorf("wire bytes %d, gzipped %d", wire, gz)
	}

	if err := c.Complete(ctx, "a/b c", protocol.CompleteRequest{Status: api.TaskSuccess}); err == nil {
		t.Error("completion of an unknown task was accepted")
	}
	if path != "/v1/agent/tasks/a%2Fb%20c/complete" {
		t.Errorf("task id not escaped in path: %q", path)
	}
}

// A control plane that requires client certificates accepts the agent's.
func TestClientCertificate(t *testing.T) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "agents CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "node-1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "agent.crt"), filepath.Join(dir, "agent.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)

	var subject string
	cp := &cptest.Server{Token: "secret"}
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		subject = r.TLS.PeerCertificates[0].Subject.CommonName
		cp.ServeHTTP(w, r)
	}))
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	ts.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	ts.StartTLS()
	defer ts.Close()
	tok := writeToken(t, "secret", 0o600)
	ctx := context.Background()

	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: ts.URL, Node: "node-1", TokenFile: tok, CAFile: writeCA(t, ts), CertFile: certFile, KeyFile: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Register(ctx, protocol.NodeInfo{Name: "node-1"}); err != nil {
		t.Fatalf("with a client certificate: %v", err)
	}
	if subject != "node-1" {
		t.Errorf("server saw client certificate %q", subject)
	}
	bare, err := protocol.NewClient(protocol.ClientConfig{BaseURL: ts.URL, Node: "node-1", TokenFile: tok, CAFile: writeCA(t, ts)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bare.Register(ctx, protocol.NodeInfo{Name: "node-1"}); err == nil {
		t.Error("accepted without a client certificate")
	}
}
