package standalone

import (
	"context"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// LocalClient is the agent's protocol client to its in-process control
// plane (runner.Client): the runner's requests are calls of the protocol
// server's methods, with no HTTP, JSON or loopback connection between
// them. A task the API queues wakes the runner's lease at once (the
// store's change channel), and its completion wakes the API's wait the
// same way; the task still goes through the runner's journal and per-VM
// queue. Refusals are the errors protocol.Client returns for the same
// answers over HTTP (protocol.StatusError).
//
// The values passed (a completion's VM view, a heartbeat's VMs) are kept
// by the control plane as they are: the runner does not change them
// after the call.
type LocalClient struct {
	srv     *cpserver.Server
	node    string
	observe func(path string, d time.Duration, err error)
}

// LocalClient returns the in-process client of node. observe, when set,
// is called after every request with the protocol path it stands for,
// its latency and its error (metrics), as protocol.ClientConfig.Observe.
func (cp *ControlPlane) LocalClient(node string, observe func(path string, d time.Duration, err error)) *LocalClient {
	return &LocalClient{srv: cp.srv, node: node, observe: observe}
}

// Node returns the node name the client sends.
func (c *LocalClient) Node() string { return c.node }

// Register announces this host.
func (c *LocalClient) Register(ctx context.Context, n protocol.NodeInfo) (*protocol.RegisterResponse, error) {
	done := c.observed(protocol.PathRegister, time.Now())
	resp, err := c.srv.Register(ctx, protocol.RegisterRequest{ProtocolVersion: protocol.Version, Node: n})
	err = c.refusal(protocol.PathRegister, err)
	done(err)
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// Lease long-polls for up to max tasks, waiting up to wait for one.
func (c *LocalClient) Lease(ctx context.Context, wait time.Duration, max int) (*protocol.LeaseResponse, error) {
	done := c.observed(protocol.PathLease, time.Now())
	resp, err := c.srv.Lease(ctx, protocol.LeaseRequest{ProtocolVersion: protocol.Version, Node: c.node,
		WaitSeconds: int(wait / time.Second), Max: max})
	err = c.refusal(protocol.PathLease, err)
	done(err)
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// Progress extends a task's lease and reports its progress (p may be nil).
func (c *LocalClient) Progress(ctx context.Context, taskID, leaseID string, p *api.Progress) (*protocol.ProgressResponse, error) {
	path := protocol.ProgressPath(taskID)
	done := c.observed(path, time.Now())
	resp, err := c.srv.Progress(ctx, taskID, protocol.ProgressRequest{ProtocolVersion: protocol.Version, Node: c.node, LeaseID: leaseID, Progress: p})
	err = c.refusal(path, err)
	done(err)
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// Complete reports a task's outcome.
func (c *LocalClient) Complete(ctx context.Context, taskID string, req protocol.CompleteRequest) error {
	path := protocol.CompletePath(taskID)
	done := c.observed(path, time.Now())
	req.ProtocolVersion, req.Node = protocol.Version, c.node
	_, err := c.srv.Complete(ctx, taskID, req)
	err = c.refusal(path, err)
	done(err)
	return err
}

// Heartbeat reports the node and its VMs.
func (c *LocalClient) Heartbeat(ctx context.Context, req protocol.HeartbeatRequest) (*protocol.HeartbeatResponse, error) {
	done := c.observed(protocol.PathHeartbeat, time.Now())
	req.ProtocolVersion, req.Node = protocol.Version, c.node
	resp, err := c.srv.Heartbeat(ctx, req)
	err = c.refusal(protocol.PathHeartbeat, err)
	done(err)
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// refusal turns an error of the server's Go API into the one its HTTP
// answer would have given protocol.Client.
func (c *LocalClient) refusal(path string, err error) error {
	if err == nil {
		return nil
	}
	code, retry := cpserver.ErrorCode(err)
	after := time.Duration(0)
	if retry {
		after = cpserver.RetryAfterSeconds * time.Second
	}
	return protocol.StatusError(errcode.HTTPStatus(code), string(code), path+": "+err.Error(), after)
}

// observed starts timing a request; the returned func reports it.
func (c *LocalClient) observed(path string, start time.Time) func(error) {
	return func(err error) {
		if c.observe != nil {
			c.observe(path, time.Since(start), err)
		}
	}
}
