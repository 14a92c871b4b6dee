package standalone

import (
	"bytes"
	"encoding/json"
	"net/http"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/scheduler"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Defaults of a create's size (seed 004), as the node applies them.
const (
	defaultVCPUs    = 2
	defaultMemoryMB = 2048
)

// placeTries bounds how often a create the scheduler placed is placed
// again because its node was full by the time the create was stored.
const placeTries = 3

// place places a create in cluster mode (docs/cluster.md, "Placement"):
// on the node it names or the scheduler's pick. Placed on this host, it
// returns the placement and c names this node and the pool; placed on
// another, the create is forwarded to that node's API (which validates it
// against its host and queues it) and done is true. With again, a
// forwarded create that node found full (no_node_fits, creates sent at
// the same instant took its room) is not answered: full is true, to
// place it again. A request from a peer was placed by the host that
// forwarded it.
func (a *API) place(w http.ResponseWriter, r *http.Request, c *api.CreateVM, body []byte, again bool) (p *api.Placement, done, full bool) {
	if _, ok := a.desiredByName(r.Context(), c.Name); ok {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q already exists", c.Name))
		return nil, true, false
	}
	if isPeer(r) {
		if h := r.Header.Get(placementHeader); h != "" {
			var got api.Placement
			if json.Unmarshal([]byte(h), &got) == nil {
				return &got, false, false
			}
		}
		return nil, false, false
	}
	if !api.IsName(c.Name) || api.IsUUID(c.Name) {
		writeErr(w, errcode.New(errcode.ValidationFailed, "name %q is not a VM name (a hostname label)", c.Name))
		return nil, true, false
	}
	if c.Arch == "" {
		writeErr(w, errcode.New(errcode.ValidationFailed, "arch is required (amd64 or arm64)"))
		return nil, true, false
	}
	nodes, err := a.cp.srv.Nodes(r.Context())
	if err != nil {
		writeErr(w, storeErr(err))
		return nil, true, false
	}
	open, err := a.cp.srv.Unfinished(r.Context())
	if err != nil {
		writeErr(w, storeErr(err))
		return nil, true, false
	}
	pick, err := scheduler.Pick(request(c), candidates(nodes, open))
	if err != nil {
		writeErr(w, err)
		return nil, true, false
	}
	p = &api.Placement{Node: pick.Node, Pool: pick.Pool, Reason: pick.Reason}
	c.Node, c.Pool = pick.Node, pick.Pool
	if pick.Node == a.cluster.Node {
		return p, false, false
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		writeErr(w, errcode.New(errcode.ValidationFailed, "bad request body: %s", err))
		return nil, true, false
	}
	fields["node"], _ = json.Marshal(pick.Node)
	fields["pool"], _ = json.Marshal(pick.Pool)
	b, _ := json.Marshal(fields)
	var target cpserver.Node
	for _, n := range nodes {
		if n.Name == pick.Node {
			target = n
		}
	}
	out := http.ResponseWriter(w)
	var held *heldResponse
	if again {
		held = &heldResponse{header: http.Header{}}
		out = held
	}
	a.proxy(out, r, target, b, p, func(err error) {
		writeErr(w, errcode.New(errcode.NodeUnavailable, "node %q cannot be reached: %s", pick.Node, err))
	})
	if held != nil && held.nodeFull() {
		return nil, true, true
	}
	if held != nil {
		held.send(w)
	}
	return nil, true, false
}

// heldResponse keeps a forwarded create's answer (a small JSON body)
// until it is known whether to send it or to place the create again.
type heldResponse struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (h *heldResponse) Header() http.Header { return h.header }

func (h *heldResponse) WriteHeader(code int) {
	if h.code == 0 {
		h.code = code
	}
}

func (h *heldResponse) Write(b []byte) (int, error) {
	h.WriteHeader(http.StatusOK)
	return h.body.Write(b)
}

// nodeFull reports whether the answer is no_node_fits.
func (h *heldResponse) nodeFull() bool {
	var env api.ErrorEnvelope
	return h.code == http.StatusConflict && json.Unmarshal(h.body.Bytes(), &env) == nil && env.Error.Code == string(errcode.NoNodeFits)
}

// send writes the answer to w (nothing when the proxy answered w itself:
// the node could not be reached).
func (h *heldResponse) send(w http.ResponseWriter) {
	if h.code == 0 {
		return
	}
	for k, v := range h.header {
		w.Header()[k] = v
	}
	w.WriteHeader(h.code)
	w.Write(h.body.Bytes())
}

// request is what a create asks of its node, with the node's defaults.
func request(c *api.CreateVM) scheduler.Request {
	req := scheduler.Request{Arch: c.Arch, VCPUs: c.VCPUs, MemoryMB: c.MemoryMB, Pool: c.Pool, Network: c.Network, Node: c.Node}
	if req.VCPUs <= 0 {
		req.VCPUs = defaultVCPUs
	}
	if req.MemoryMB <= 0 {
		req.MemoryMB = defaultMemoryMB
	}
	return req
}

// checkCreate is cluster mode's check of a placed create as the store
// stores it (cpserver.Server.CheckCreate, docs/cluster.md "Placement"):
// the scheduler's check of its node, against the node's record and the
// creates under way at that moment. Two creates placed at once on the
// same free memory or vCPUs cannot both pass it: the store stores no
// other create for the node between its read and its commit.
func checkCreate(t cpserver.Task, n cpserver.Node, open []cpserver.Task) error {
	if t.Placement == nil {
		return nil // standalone, or a VM created again where it is
	}
	var c api.CreateVM
	if err := json.Unmarshal(t.Spec, &c); err != nil {
		return err
	}
	req := request(&c)
	req.Node = t.Node
	_, err := scheduler.Pick(req, candidates([]cpserver.Node{n}, open))
	return err
}

// candidates are the store's nodes as the scheduler sees them: each with
// the memory and vCPUs its VMs hold (those not stopped, as its last
// heartbeat reports them) and its creates under way (queued or running,
// not yet in a heartbeat).
func candidates(nodes []cpserver.Node, open []cpserver.Task) []scheduler.Node {
	out := make([]scheduler.Node, 0, len(nodes))
	for _, n := range nodes {
		sn := scheduler.Node{Name: n.Name, State: nodeView(n).State, Info: n.Info}
		seen := map[string]bool{}
		for _, v := range n.VMs {
			seen[v.UUID] = true
			switch v.Status {
			case api.StatusStopped, api.StatusCrashed, api.StatusError, api.StatusDeleted:
				continue
			}
			sn.UsedMemoryMB += int64(v.MemoryMB)
			sn.UsedVCPUs += v.VCPUs
		}
		for _, t := range open {
			if t.Type != api.TaskCreate || t.Node != n.Name || seen[t.VMUUID] {
				continue
			}
			var c api.CreateVM
			if json.Unmarshal(t.Spec, &c) != nil {
				continue
			}
			req := request(&c)
			sn.UsedMemoryMB += int64(req.MemoryMB)
			sn.UsedVCPUs += req.VCPUs
		}
		out = append(out, sn)
	}
	return out
}
