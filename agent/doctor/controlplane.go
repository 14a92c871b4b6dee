package doctor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// controlPlaneTimeout bounds the control-plane check.
const controlPlaneTimeout = 10 * time.Second

// checkControlPlane GETs the control plane's base URL with the token and
// CA of the config. Any HTTP answer proves it reachable; 401 and 403 mean
// the token is refused.
func checkControlPlane(ctx context.Context, cfg *config.Config, env Env) Result {
	r := Result{Check: "control plane"}
	cp := cfg.ControlPlane
	switch {
	case cfg.Standalone:
		r.Status, r.Detail = OK, "standalone: true: the agent is its own control plane (in-process)"
		return r
	case cfg.ClusterMode():
		// Config validation refuses control_plane.url here: the agent
		// serves the protocol itself, over the cluster's etcd.
		r.Status = OK
		r.Detail = fmt.Sprintf("cluster mode: the agent is a control-plane replica on etcd %s (not contacted by doctor)",
			strings.Join(cfg.Cluster.Etcd.Endpoints, ","))
		return r
	}
	if cp.URL == "" {
		r.Status, r.Detail = Warn, "control_plane.url is not set: the agent runs only with --standalone (or standalone: true, or cluster.etcd)"
		r.Fix = "set control_plane.url and control_plane.token_file, or standalone: true"
		return r
	}
	// The agent's own client checks the URL scheme, the token file's mode
	// and the TLS material: its verdict is the one that counts at start.
	if _, err := protocol.NewClient(protocol.ClientConfig{
		BaseURL: cp.URL, Node: orNode(cfg.NodeName), TokenFile: cp.TokenFile,
		CAFile: cp.CAFile, CertFile: cp.CertFile, KeyFile: cp.KeyFile,
	}); err != nil {
		r.Status, r.Detail = Fail, err.Error()
		r.Fix = "fix control_plane in the config (token file mode 0600, CA and certificate files, https URL)"
		return r
	}
	token, err := readToken(cp.TokenFile)
	if err != nil {
		r.Status, r.Detail, r.Fix = Fail, err.Error(), "write this node's token to "+cp.TokenFile
		return r
	}
	hc := env.HTTPClient
	if hc == nil {
		tc, err := tlsConfig(cp)
		if err != nil {
			r.Status, r.Detail, r.Fix = Fail, err.Error(), "fix control_plane.ca_file, cert_file and key_file"
			return r
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tc
		hc = &http.Client{Transport: tr}
		defer tr.CloseIdleConnections()
	}
	ctx, cancel := context.WithTimeout(ctx, controlPlaneTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cp.URL, nil)
	if err != nil {
		r.Status, r.Detail, r.Fix = Fail, fmt.Sprintf("control_plane.url: %v", err), "fix control_plane.url"
		return r
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("User-Agent", "otherix-agent-doctor")
	resp, err := hc.Do(req)
	if err != nil {
		var verr *tls.CertificateVerificationError
		switch {
		case errors.As(err, &verr):
			r.Status, r.Detail = Fail, fmt.Sprintf("%s: certificate not trusted: %v", cp.URL, verr.Err)
			r.Fix = "set control_plane.ca_file to the CA that signed the control plane's certificate"
		case ctx.Err() != nil:
			r.Status, r.Detail = Fail, fmt.Sprintf("%s: no answer within %s", cp.URL, controlPlaneTimeout)
			r.Fix = "check the URL, DNS, routes and firewalls between this host and the control plane"
		default:
			r.Status, r.Detail = Fail, fmt.Sprintf("%s unreachable: %v", cp.URL, unwrapURL(err))
			r.Fix = "check the URL, DNS, routes and firewalls between this host and the control plane"
		}
		return r
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden {
		r.Status, r.Detail = Fail, fmt.Sprintf("%s refused the token: HTTP %d", cp.URL, resp.StatusCode)
		r.Fix = "put this node's current token in " + cp.TokenFile
		return r
	}
	r.Status, r.Detail = OK, fmt.Sprintf("%s answers (HTTP %d) and accepts the token", cp.URL, resp.StatusCode)
	return r
}

func orNode(n string) string {
	if n == "" {
		return "doctor"
	}
	return n
}

// readToken reads the bearer token (never printed).
func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", unwrapPath(err))
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return t, nil
}

// tlsConfig trusts control_plane.ca_file when set (else the system roots)
// and presents the client certificate when both files are set.
func tlsConfig(cp config.ControlPlane) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cp.CAFile != "" {
		pem, err := os.ReadFile(cp.CAFile)
		if err != nil {
			return nil, fmt.Errorf("control_plane.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("control_plane.ca_file %s: no PEM certificate", cp.CAFile)
		}
		tc.RootCAs = pool
	}
	if cp.CertFile != "" && cp.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(cp.CertFile, cp.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// unwrapURL drops *url.Error's "Get \"...\":" prefix, the URL being in
// the detail already.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
