package standalone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Cluster mode: every host's API answers for every VM (docs/cluster.md,
// "One API on every host"). A request about a VM of another node is
// forwarded to that node's API, as Incus forwards a request to the member
// that owns the instance: the host that has the VM's disks, console log,
// events, ports and devices answers and validates, and queues the task
// (through the shared store, for its own node). A VM whose node is lost
// still shows in vm get and vm list, from its node's last heartbeat, with
// node_state lost; any other request about it is node_unavailable. vm
// list shows every node's VMs from their last heartbeats (vmsView): one
// store read, not a call to every host.

// Cluster is what the API needs in cluster mode.
type Cluster struct {
	// Node is this host's node name.
	Node string
	// PeerToken returns the token the hosts of the cluster present to one
	// another's API (kept in the store).
	PeerToken func(ctx context.Context) (string, error)

	mu         sync.Mutex
	transports map[string]*http.Transport // by cert sha256
}

// placementHeader carries a forwarded create's placement, trusted from a
// peer only.
const placementHeader = "X-Otherix-Placement"

type peerKey struct{}

// isPeer reports whether r came from another host of the cluster (with
// the peer token): it is served here, never forwarded again.
func isPeer(r *http.Request) bool { return r.Context().Value(peerKey{}) != nil }

// RequireTokens is RequireToken that also lets in another host of the
// cluster: a request with "Bearer <peer token>" is served as a peer's.
func RequireTokens(h http.Handler, token string, peer func(context.Context) (string, error)) http.Handler {
	if peer == nil {
		return RequireToken(h, token)
	}
	user := RequireToken(h, token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if ok && got != token {
			if p, err := peer(r.Context()); err == nil && subtle.ConstantTimeCompare([]byte(got), []byte(p)) == 1 {
				h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), peerKey{}, true)))
				return
			}
		}
		user.ServeHTTP(w, r)
	})
}

// SetCluster turns cluster mode on (call it before serving).
func (a *API) SetCluster(c *Cluster) { a.cluster = c }

// clusterRoute forwards the requests about a VM of another node to it.
func (a *API) clusterRoute(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rest, ok := strings.CutPrefix(r.URL.Path, "/v1/vms/")
		if !ok || isPeer(r) {
			h.ServeHTTP(w, r)
			return
		}
		name, _, _ := strings.Cut(rest, "/")
		if !api.IsName(name) || api.IsUUID(name) {
			h.ServeHTTP(w, r)
			return
		}
		vm, ok := a.desiredByName(r.Context(), name)
		if !ok || vm.Node == "" || vm.Node == a.cluster.Node {
			h.ServeHTTP(w, r)
			return
		}
		a.forwardVM(w, r, vm)
	})
}

// desiredByName finds a VM of the desired map by name: one read of the
// store's name index.
func (a *API) desiredByName(ctx context.Context, name string) (cpserver.VM, bool) {
	v, ok, err := a.cp.srv.VMByName(ctx, name)
	return v, ok && err == nil
}

// nodeNamed returns a node of the store with its state as views show it.
func (a *API) nodeNamed(ctx context.Context, name string) (cpserver.Node, error) {
	nodes, err := a.cp.srv.Nodes(ctx)
	if err != nil {
		return cpserver.Node{}, err
	}
	for _, n := range nodes {
		if n.Name == name {
			n.State = nodeView(n).State
			return n, nil
		}
	}
	return cpserver.Node{Name: name, State: api.NodeLost}, nil
}

// forwardVM forwards r to the node of vm, or answers from its last
// heartbeat when that node is lost or cannot be reached.
func (a *API) forwardVM(w http.ResponseWriter, r *http.Request, vm cpserver.VM) {
	n, err := a.nodeNamed(r.Context(), vm.Node)
	if err != nil {
		writeErr(w, storeErr(err))
		return
	}
	if n.State == api.NodeLost || n.Info == nil || n.Info.APIURL == "" {
		a.lostVM(w, r, n, vm)
		return
	}
	a.proxy(w, r, n, nil, nil, func(error) { a.lostVM(w, r, n, vm) })
}

// proxy forwards r to node n's API, with body instead of r's when given
// and placement in placementHeader. onErr answers when n cannot be
// reached.
func (a *API) proxy(w http.ResponseWriter, r *http.Request, n cpserver.Node, body []byte, placement *api.Placement, onErr func(error)) {
	target, err := url.Parse(n.Info.APIURL)
	if err != nil {
		onErr(err)
		return
	}
	token, err := a.cluster.PeerToken(r.Context())
	if err != nil {
		writeErr(w, storeErr(err))
		return
	}
	var pj []byte
	if placement != nil {
		pj, _ = json.Marshal(placement)
	}
	p := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Header.Set("Authorization", "Bearer "+token)
			pr.Out.Header.Del(placementHeader)
			if pj != nil {
				pr.Out.Header.Set(placementHeader, string(pj))
			}
			if body != nil {
				pr.Out.Body = io.NopCloser(bytes.NewReader(body))
				pr.Out.ContentLength = int64(len(body))
				pr.Out.GetBody = nil
			}
		},
		Transport:    a.cluster.transport(n.Info.APICertSHA256),
		ErrorHandler: func(_ http.ResponseWriter, _ *http.Request, err error) { onErr(err) },
	}
	p.ServeHTTP(w, r)
}

// transport reaches another host's API: over TLS, it trusts exactly the
// certificate the host registered (its sha256 in the store, which etcd's
// own TLS guards), as a cluster member trusts the certificates in its
// cluster's database.
func (c *Cluster) transport(certSHA256 string) *http.Transport {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := c.transports[certSHA256]; t != nil {
		return t
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = 0
	want := strings.ToLower(certSHA256)
	t.TLSClientConfig = &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // checked below against the pinned sha256
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("peer sent no certificate")
			}
			sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if want == "" || subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(want)) != 1 {
				return errors.New("peer certificate is not the one its node registered")
			}
			return nil
		},
	}
	if c.transports == nil {
		c.transports = map[string]*http.Transport{}
	}
	c.transports[certSHA256] = t
	return t
}

// lostVM answers a request about vm whose node n cannot answer: GET of
// the VM is its view from n's last heartbeat (remoteView); any other
// request is node_unavailable.
func (a *API) lostVM(w http.ResponseWriter, r *http.Request, n cpserver.Node, vm cpserver.VM) {
	if r.Method == http.MethodGet && r.URL.Path == "/v1/vms/"+vm.Name {
		v := api.VM{Name: vm.Name, UUID: vm.UUID, Node: n.Name, NodeState: nodeView(n).State, Status: "unknown",
			InstanceStatus: api.InstanceStatus("unknown"), DesiredPhase: vm.Phase}
		for _, st := range n.VMs {
			if st.UUID == vm.UUID {
				v = remoteView(n, st)
			}
		}
		v.Placement = vm.Placement
		writeJSON(w, http.StatusOK, v)
		return
	}
	w.Header().Set("Retry-After", strconv.Itoa(cpserver.RetryAfterSeconds))
	writeErr(w, errcode.New(errcode.NodeUnavailable, "vm %q is on node %q, which is %s: only its view (vm get, vm list) answers, from the node's last heartbeat",
		vm.Name, n.Name, nodeView(n).State))
}

// placed adds the desired map's placements to views (cluster mode).
func (a *API) placed(ctx context.Context, vms ...*api.VM) {
	if a.cluster == nil || len(vms) == 0 {
		return
	}
	if len(vms) == 1 {
		if d, ok := a.cp.srv.VM(ctx, vms[0].UUID); ok {
			vms[0].Placement = d.Placement
		}
		return
	}
	all, _, err := a.cp.srv.VMs(ctx)
	if err != nil {
		return
	}
	by := make(map[string]*api.Placement, len(all))
	for _, v := range all {
		by[v.UUID] = v.Placement
	}
	for _, v := range vms {
		v.Placement = by[v.UUID]
	}
}
