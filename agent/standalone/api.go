package standalone

import (
	"bufio"
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/otherix/otherix-agent/agent"
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/errcode"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/vm"
)

// Bounds of the API's request bodies: a create (user-data is at most
// 64 KiB by default; the rest of a create is small), a stop, a pull.
const (
	maxBody     = 1 << 20
	maxStopBody = 4 << 10
	maxPullBody = 64 << 10
	// maxSmallBody bounds the other bodies (a device, an update, a volume).
	maxSmallBody = 4 << 10
)

// API serves seed 004's /v1/vms surface over the control plane.
type API struct {
	host *agent.Host
	cp   *ControlPlane
	log  *zap.Logger
	// SyncTimeout bounds sync ops (reset, pause, resume).
	SyncTimeout time.Duration
}

// NewAPI returns the API handler.
func NewAPI(h *agent.Host, cp *ControlPlane, log *zap.Logger) *API {
	return &API{host: h, cp: cp, log: log, SyncTimeout: 2 * time.Minute}
}

// Handler returns the HTTP routes.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/vms", a.create)
	mux.HandleFunc("GET /v1/vms", a.list)
	mux.HandleFunc("GET /v1/vms/{name}", a.get)
	mux.HandleFunc("PATCH /v1/vms/{name}", a.patch)
	mux.HandleFunc("POST /v1/vms/{name}/disks", a.disk(true))
	mux.HandleFunc("DELETE /v1/vms/{name}/disks", a.disk(false))
	mux.HandleFunc("POST /v1/vms/{name}/cdroms/{index}", a.medium)
	mux.HandleFunc("POST /v1/vms/{name}/forwards", a.forward(true))
	mux.HandleFunc("DELETE /v1/vms/{name}/forwards", a.forward(false))
	mux.HandleFunc("GET /v1/firmwares", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.FirmwareList{Firmwares: a.host.Firmwares()})
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", a.async(api.TaskDelete))
	mux.HandleFunc("POST /v1/vms/{name}/start", a.async(api.TaskStart))
	mux.HandleFunc("POST /v1/vms/{name}/stop", a.async(api.TaskStop))
	mux.HandleFunc("POST /v1/vms/{name}/poweroff", a.async(api.TaskPoweroff))
	mux.HandleFunc("POST /v1/vms/{name}/reboot", a.async(api.TaskReboot))
	mux.HandleFunc("POST /v1/vms/{name}/delete", a.async(api.TaskDelete))
	mux.HandleFunc("POST /v1/vms/{name}/reset", a.sync(api.TaskReset))
	mux.HandleFunc("POST /v1/vms/{name}/pause", a.sync(api.TaskPause))
	mux.HandleFunc("POST /v1/vms/{name}/resume", a.sync(api.TaskResume))
	mux.HandleFunc("GET /v1/vms/{name}/console", a.console)
	mux.HandleFunc("GET /v1/vms/{name}/stats", a.stats)
	mux.HandleFunc("GET /v1/vms/{name}/screenshot", a.screenshot)
	mux.HandleFunc("GET /v1/tasks/{id}", a.task)
	mux.HandleFunc("GET /v1/volumes", a.volumes)
	mux.HandleFunc("POST /v1/volumes", a.createVolume)
	mux.HandleFunc("DELETE /v1/volumes/{name}", a.deleteVolume)
	mux.HandleFunc("GET /v1/images", a.images)
	mux.HandleFunc("POST /v1/images", a.pullImage)
	mux.HandleFunc("GET /v1/node", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.host.Node(r.Context()))
	})
	return routed(mux)
}

// StatusOf maps an error code to its HTTP status.
func StatusOf(code errcode.Code) int {
	switch code {
	case errcode.ValidationFailed, errcode.DefaultPoolNotSet, errcode.ImageFormatUnsupported:
		return http.StatusBadRequest
	case errcode.NotFound, errcode.NetworkNotFound, errcode.PoolNotFound, errcode.DeviceNotFound:
		return http.StatusNotFound
	case errcode.Conflict, errcode.PoolNotOnNode, errcode.PortInUse, errcode.DeviceBusy, errcode.IOMMUUnavailable:
		return http.StatusConflict
	case errcode.Unauthorized:
		return http.StatusUnauthorized
	case errcode.RateLimited:
		return http.StatusTooManyRequests
	case errcode.NetworkUnavailable:
		return http.StatusServiceUnavailable
	case errcode.DiskFull:
		return http.StatusInsufficientStorage
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	code := errcode.Of(err)
	writeJSON(w, StatusOf(code), api.ErrorEnvelope{Error: api.Error{Code: string(code), Message: errcode.MessageOf(err)}})
}

func (a *API) create(w http.ResponseWriter, r *http.Request) {
	var c api.CreateVM
	b, err := decodeBody(w, r, maxBody, &c, false)
	if err == nil {
		err = explicitZero(b, defaultedKeys...)
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	if err := a.host.ValidateCreate(&c); err != nil {
		writeErr(w, err)
		return
	}
	if _, err := a.host.VM(c.Name); err == nil {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q already exists", c.Name))
		return
	}
	if t, busy := a.cp.Busy(c.Name); busy {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", c.Name, t.ID, t.Type))
		return
	}
	a.enqueue(w, api.TaskCreate, c.Name, uuid.NewString(), c)
}

// queue queues a task. When it cannot, it answers the request (429 with
// Retry-After when the control plane holds too many unfinished tasks) and
// returns false.
func (a *API) queue(w http.ResponseWriter, typ, vmName, vmUUID string, spec any) (api.Task, bool) {
	t, err := a.cp.Enqueue(typ, vmName, vmUUID, spec)
	var busy *cpserver.TooManyTasksError
	switch {
	case errors.As(err, &busy):
		w.Header().Set("Retry-After", strconv.Itoa(cpserver.RetryAfterSeconds))
		// The code is conflict until errcode has one for this
		// (rate_limited); the status tells clients to come back.
		writeJSON(w, http.StatusTooManyRequests, api.ErrorEnvelope{Error: api.Error{Code: string(errcode.RateLimited), Message: err.Error()}})
		return t, false
	case err != nil:
		writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
		return t, false
	}
	return t, true
}

// enqueue queues a task and answers 202 with it.
func (a *API) enqueue(w http.ResponseWriter, typ, vmName, vmUUID string, spec any) {
	if t, ok := a.queue(w, typ, vmName, vmUUID, spec); ok {
		writeJSON(w, http.StatusAccepted, t)
	}
}

// listPage is the body of GET /v1/vms.
type listPage struct {
	VMs        []api.VM `json:"vms"`
	NextCursor string   `json:"next_cursor,omitempty"`
}

func (a *API) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			writeErr(w, errcode.New(errcode.ValidationFailed, "limit must be 1..1000"))
			return
		}
		limit = n
	}
	// The cursor is the last name of the previous page.
	cursor := q.Get("cursor")
	if cursor != "" && (!api.IsName(cursor) || api.IsUUID(cursor)) {
		writeErr(w, errcode.New(errcode.ValidationFailed, "cursor %q is not a next_cursor this API gave", cursor))
		return
	}
	all := a.host.VMs(r.Context())
	sort.Slice(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	var out []api.VM
	next := ""
	for _, v := range all {
		if cursor != "" && v.Name <= cursor {
			continue
		}
		if p := q.Get("pool"); p != "" && v.Pool != p {
			continue
		}
		if n := q.Get("node"); n != "" && v.Node != n {
			continue
		}
		if s := q.Get("status"); s != "" && v.Status != s {
			continue
		}
		if len(out) == limit {
			next = out[len(out)-1].Name
			break
		}
		out = append(out, v)
	}
	if out == nil {
		out = []api.VM{}
	}
	writeJSON(w, http.StatusOK, listPage{VMs: out, NextCursor: next})
}

func (a *API) vmName(w http.ResponseWriter, r *http.Request) (string, bool) {
	name := r.PathValue("name")
	if vm.IsUUID(name) {
		writeErr(w, errcode.New(errcode.ValidationFailed, "%q is a UUID literal: VMs are addressed by name", name))
		return "", false
	}
	return name, true
}

func (a *API) get(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	v, err := a.host.VM(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// stats answers a VM's usage: GET /v1/vms/{name}/stats.
func (a *API) stats(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	st, err := a.host.Stats(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// target resolves the VM an op names: it must exist on this host.
func (a *API) target(w http.ResponseWriter, r *http.Request) (api.VM, bool) {
	name, ok := a.vmName(w, r)
	if !ok {
		return api.VM{}, false
	}
	v, err := a.host.VM(name)
	if err != nil {
		writeErr(w, err)
		return api.VM{}, false
	}
	return v, true
}

func (a *API) async(typ string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, ok := a.target(w, r)
		if !ok {
			return
		}
		var spec any
		if typ == api.TaskStop {
			var s api.StopSpec
			if _, err := decodeBody(w, r, maxStopBody, &s, true); err != nil {
				writeErr(w, err)
				return
			}
			if s.Force {
				// seed 004: stop --force dispatches poweroff
				a.enqueue(w, api.TaskPoweroff, v.Name, v.UUID, nil)
				return
			}
			spec = s
		}
		a.enqueue(w, typ, v.Name, v.UUID, spec)
	}
}

// sync runs an op through the control plane and answers with its result.
func (a *API) sync(typ string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, ok := a.target(w, r)
		if !ok {
			return
		}
		// Answer the obvious conflicts at once, as seed 004 documents.
		switch {
		case typ == api.TaskPause && v.Status == api.StatusPaused,
			typ == api.TaskResume && v.Status == api.StatusRunning:
			writeErr(w, errcode.New(errcode.Conflict, "vm %q is already %s", v.Name, v.Status))
			return
		}
		t, ok := a.queue(w, typ, v.Name, v.UUID, nil)
		if !ok {
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), a.SyncTimeout)
		defer cancel()
		done, err := a.cp.Wait(ctx, t.ID)
		if err != nil {
			writeErr(w, errcode.Wrap(errcode.Internal, err, "task %s did not finish", t.ID))
			return
		}
		t = done
		if t.Status != api.TaskSuccess {
			e := api.Error{Code: string(errcode.Internal), Message: "task " + t.Status}
			if t.Error != nil {
				e = *t.Error
			}
			writeJSON(w, StatusOf(errcode.Code(e.Code)), api.ErrorEnvelope{Error: e})
			return
		}
		if t.Result != nil {
			writeJSON(w, http.StatusOK, t.Result)
			return
		}
		nv, _ := a.host.VM(v.Name)
		writeJSON(w, http.StatusOK, nv)
	}
}

func (a *API) console(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	v, err := a.host.Engine().Get(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	f, err := os.Open(v.ConsolePath)
	if errors.Is(err, os.ErrNotExist) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		return
	}
	if err != nil {
		writeErr(w, errcode.Wrap(errcode.Internal, err, "console log"))
		return
	}
	defer f.Close()
	if s := r.URL.Query().Get("tail"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 1 {
			writeErr(w, errcode.New(errcode.ValidationFailed, "tail must be a positive number of bytes"))
			return
		}
		if fi, err := f.Stat(); err == nil && fi.Size() > n {
			f.Seek(fi.Size()-n, io.SeekStart)
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.Copy(w, f)
}

func (a *API) task(w http.ResponseWriter, r *http.Request) {
	t, ok := a.cp.Task(r.PathValue("id"))
	if !ok {
		writeErr(w, errcode.New(errcode.NotFound, "task %q not found", r.PathValue("id")))
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (a *API) images(w http.ResponseWriter, r *http.Request) {
	imgs, err := a.host.Images(r.URL.Query().Get("pool"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, api.ImageList{Images: imgs})
}

func (a *API) pullImage(w http.ResponseWriter, r *http.Request) {
	var p api.PullImage
	if _, err := decodeBody(w, r, maxPullBody, &p, false); err != nil {
		writeErr(w, err)
		return
	}
	if p.URL == "" {
		writeErr(w, errcode.New(errcode.ValidationFailed, "url is required"))
		return
	}
	if p.Pool == "" {
		def, err := a.host.Cache().DefaultPool()
		if err != nil {
			writeErr(w, err)
			return
		}
		p.Pool = def
	}
	if _, err := a.host.Cache().PoolDir(p.Pool); err != nil {
		writeErr(w, err)
		return
	}
	a.enqueue(w, api.TaskImagePull, "", "", p)
}

// Limits bound what clients can take from the standalone server (the /v1
// API, /metrics and the in-process control plane).
type Limits struct {
	// MaxConns is the most connections one listener serves at once. A
	// connection over it gets "503 Service Unavailable" with Retry-After
	// and is closed.
	MaxConns int
	// MaxHeaderBytes bounds a request's header (431 over it).
	MaxHeaderBytes int
	// ReadHeaderTimeout bounds the reading of a request's whole header,
	// however slowly it trickles in.
	ReadHeaderTimeout time.Duration
	// BodyTimeout bounds the reading of a request's body, from the time
	// its handler starts. It is lifted once the body is read, so that a
	// handler may wait long (a lease's long-poll, a sync op).
	BodyTimeout time.Duration
	// WriteTimeout bounds each write of a response: a client that stops
	// reading is cut, one that reads slowly is not.
	WriteTimeout time.Duration
	// IdleTimeout closes a keep-alive connection idle for this long.
	IdleTimeout time.Duration
}

// DefaultLimits are the limits of the standalone server.
func DefaultLimits() Limits {
	return Limits{
		MaxConns:          256,
		MaxHeaderBytes:    64 << 10,
		ReadHeaderTimeout: 10 * time.Second,
		BodyTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
}

// NewServer returns the standalone http.Server: h behind Guard, with l's
// header bound and timeouts. Serve it on listeners from LimitListener.
// Server-level ReadTimeout and WriteTimeout stay unset: a read deadline
// over a handler's lifetime cancels its request's context, and a global
// write deadline would cut the long-poll and the console stream.
func NewServer(h http.Handler, l Limits, log *zap.Logger) *http.Server {
	if log == nil {
		log = zap.NewNop()
	}
	return &http.Server{
		Handler:           Guard(h, l),
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		MaxHeaderBytes:    l.MaxHeaderBytes,
		IdleTimeout:       l.IdleTimeout,
		ErrorLog:          stdLog(log),
	}
}

// stdLog is net/http's error log at debug level: clients can make it log
// at will (TLS handshake errors).
func stdLog(log *zap.Logger) *stdlog.Logger {
	l, err := zap.NewStdLogAt(log, zapcore.DebugLevel)
	if err != nil {
		return zap.NewStdLog(zap.NewNop())
	}
	return l
}

// Guard puts l's body and write deadlines on every request of h: the body
// must arrive within BodyTimeout, and each write of the response within
// WriteTimeout of its start.
func Guard(h http.Handler, l Limits) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		gw := &guardedWriter{ResponseWriter: w, rc: rc, timeout: l.WriteTimeout}
		gw.extend()
		if r.Body != nil && r.Body != http.NoBody && l.BodyTimeout > 0 {
			// A request without a body is left alone: net/http is
			// already watching its connection, and a deadline would
			// cancel the request when it passed.
			rc.SetReadDeadline(time.Now().Add(l.BodyTimeout))
			r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
		}
		h.ServeHTTP(gw, r)
	})
}

// guardedWriter gives each write of a response a fresh write deadline.
type guardedWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
}

func (g *guardedWriter) extend() {
	if g.timeout > 0 {
		g.rc.SetWriteDeadline(time.Now().Add(g.timeout))
	}
}

func (g *guardedWriter) WriteHeader(status int) {
	g.extend()
	g.ResponseWriter.WriteHeader(status)
}

func (g *guardedWriter) Write(p []byte) (int, error) {
	g.extend()
	return g.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the connection.
func (g *guardedWriter) Unwrap() http.ResponseWriter { return g.ResponseWriter }

// deadlineBody lifts the body's read deadline once the body is read: net/http
// then watches the connection for the client going away, and that read must
// not time out while the handler works (net/http lifts it too since Go 1.2x;
// this keeps older ones right).
type deadlineBody struct {
	io.ReadCloser
	rc *http.ResponseController
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// rejectTimeout bounds the answer to a connection over the limit.
const rejectTimeout = 2 * time.Second

// maxRejecting bounds the connections being answered 503 at once; past it
// they are closed with no answer.
const maxRejecting = 64

// LimitListener returns a listener that serves at most max connections of
// ln at once (max <= 0: no limit). A connection over the limit is not
// served: its request is read (within a short deadline) and answered
// "503 Service Unavailable" with Retry-After, and the connection is
// closed. With tlsConfig, connections are TLS (the returned listener
// yields *tls.Conn, which net/http serves as HTTPS) and so is the 503.
func LimitListener(ln net.Listener, max int, tlsConfig *tls.Config) net.Listener {
	l := &limitListener{Listener: ln, tls: tlsConfig, rejecting: make(chan struct{}, maxRejecting)}
	if max > 0 {
		l.slots = make(chan struct{}, max)
	}
	return l
}

type limitListener struct {
	net.Listener
	tls       *tls.Config
	slots     chan struct{} // one per open connection; nil: no limit
	rejecting chan struct{} // one per connection being answered 503
	onRelease func()        // tests
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.slots != nil {
			select {
			case l.slots <- struct{}{}:
			default:
				select {
				case l.rejecting <- struct{}{}:
					go l.reject(c)
				default:
					c.Close()
				}
				continue
			}
			c = &limitConn{Conn: c, l: l}
		}
		if l.tls != nil {
			c = tls.Server(c, l.tls)
		}
		return c, nil
	}
}

func (l *limitListener) release() {
	<-l.slots
	if l.onRelease != nil {
		l.onRelease()
	}
}

// reject answers one request on c with 503 and closes c. The answer goes
// after the request so that HTTP clients read it; then the connection
// stops writing and drains what the client still sends, so that closing
// it does not reset the answer away.
func (l *limitListener) reject(c net.Conn) {
	defer func() { <-l.rejecting }()
	defer c.Close()
	c.SetDeadline(time.Now().Add(rejectTimeout))
	conn := c
	if l.tls != nil {
		conn = tls.Server(c, l.tls)
	}
	if _, err := http.ReadRequest(bufio.NewReader(io.LimitReader(conn, 64<<10))); err != nil {
		return
	}
	body, _ := json.Marshal(api.ErrorEnvelope{Error: api.Error{Code: string(errcode.Conflict),
		Message: "too many connections to this agent: retry later"}})
	fmt.Fprintf(conn, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"+
		"Connection: close\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	if cw, ok := conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		io.Copy(io.Discard, io.LimitReader(conn, 1<<20))
	}
}

// limitConn gives its slot back when closed.
type limitConn struct {
	net.Conn
	l    *limitListener
	once sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.l.release)
	return err
}

// Security is what the standalone API's TCP listener asks of clients.
type Security struct {
	TLS   *tls.Config // nil: plain HTTP
	Token string      // "": no bearer token asked
}

// minTokenLen is the shortest API token accepted.
const minTokenLen = 16

// CheckListen loads what the standalone API's TCP listener needs and
// refuses an address beyond loopback without TLS and a token: the API
// creates VMs and hands them user-data, so it is never open to the network
// unencrypted or unauthenticated. addr is listen.api; certFile and keyFile
// (listen.tls_cert, listen.tls_key) are a PEM certificate chain and key;
// tokenFile (listen.token_file) holds the bearer token that RequireToken
// asks for, readable by its owner only. On loopback they are optional, and
// used when given.
func CheckListen(addr, certFile, keyFile, tokenFile string) (Security, error) {
	var sec Security
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return sec, fmt.Errorf("listen.api %q: %w", addr, err)
	}
	if (certFile == "") != (keyFile == "") {
		return sec, errors.New("listen.tls_cert and listen.tls_key go together: set both or neither")
	}
	if !isLoopback(host) && (certFile == "" || tokenFile == "") {
		return sec, fmt.Errorf("listen.api %q is not a loopback address: serving the API beyond this host needs TLS and a token "+
			"(set listen.tls_cert, listen.tls_key and listen.token_file), or listen on 127.0.0.1", addr)
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return sec, fmt.Errorf("listen.tls_cert/listen.tls_key: %w", err)
		}
		sec.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	if tokenFile != "" {
		fi, err := os.Stat(tokenFile)
		if err != nil {
			return sec, fmt.Errorf("listen.token_file: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return sec, fmt.Errorf("listen.token_file %s is accessible by group or others (mode %v): chmod 600 it", tokenFile, fi.Mode().Perm())
		}
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return sec, fmt.Errorf("listen.token_file: %w", err)
		}
		sec.Token = strings.TrimSpace(string(b))
		if len(sec.Token) < minTokenLen || strings.ContainsAny(sec.Token, " \t\r\n") {
			return sec, fmt.Errorf("listen.token_file %s: the token must be one word of at least %d characters", tokenFile, minTokenLen)
		}
	}
	return sec, nil
}

// isLoopback reports whether a listen host stays on this machine. An empty
// host (all interfaces) and names other than localhost do not.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	host, _, _ = strings.Cut(host, "%") // zone
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// RequireToken answers 401 unauthorized to requests of h without
// "Authorization: Bearer <token>" (an empty token asks nothing). The agent
// protocol under /v1/agent/ is let through: it carries the control
// plane's own token in the same header, and checks it.
func RequireToken(h http.Handler, token string) http.Handler {
	if token == "" {
		return h
	}
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(path.Clean(r.URL.Path), "/v1/agent/") {
			h.ServeHTTP(w, r)
			return
		}
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="otherix"`)
			writeErr(w, errcode.New(errcode.Unauthorized, "missing or wrong bearer token: otherix reads it from --token-file, $OTHERIX_TOKEN or /var/lib/otherix/api.token (the agent's <data_dir>/api.token, or listen.token_file)"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// patch is PATCH /v1/vms/{name} (seed 003's InstanceUpdateRequest): CPU,
// memory, autostart. Changes to a running VM's CPU or memory apply at its
// next start (pending_changes in the view).
func (a *API) patch(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	var u api.UpdateVM
	if _, err := decodeBody(w, r, maxSmallBody, &u, false); err != nil {
		writeErr(w, err)
		return
	}
	if t, busy := a.cp.Busy(name); busy {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", name, t.ID, t.Type))
		return
	}
	v, err := a.host.Update(r.Context(), name, u)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// forward adds (POST, a PROXY device body) or removes (DELETE,
// ?source_proto=tcp&source_port=N) a port forward of a VM, running or not.
func (a *API) forward(add bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name, ok := a.vmName(w, r)
		if !ok {
			return
		}
		var d api.Device
		if add {
			if _, err := decodeBody(w, r, maxSmallBody, &d, false); err != nil {
				writeErr(w, err)
				return
			}
			if d.DevType != "" && d.DevType != api.DevProxy {
				writeErr(w, errcode.New(errcode.ValidationFailed, "dev_type must be PROXY"))
				return
			}
		} else {
			q := r.URL.Query()
			port, err := strconv.Atoi(q.Get("source_port"))
			if err != nil {
				writeErr(w, errcode.New(errcode.ValidationFailed, "source_port must be a number"))
				return
			}
			d = api.Device{SourceProto: q.Get("source_proto"), SourcePort: port, DestPort: 1}
		}
		if t, busy := a.cp.Busy(name); busy {
			writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", name, t.ID, t.Type))
			return
		}
		var v api.VM
		var err error
		if add {
			v, err = a.host.AddForward(r.Context(), name, d)
		} else {
			v, err = a.host.RemoveForward(r.Context(), name, d)
		}
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
	}
}

// screenshot is GET /v1/vms/{name}/screenshot: a PNG of the VM's display.
func (a *API) screenshot(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	png, err := a.host.Screenshot(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return
	}
	w.Header().Set("Content-Type", "image/png")
	w.Write(png)
}

func (a *API) volumes(w http.ResponseWriter, r *http.Request) {
	vs, err := a.host.Volumes(r.URL.Query().Get("pool"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"volumes": vs})
}

func (a *API) createVolume(w http.ResponseWriter, r *http.Request) {
	var c api.CreateVolume
	if _, err := decodeBody(w, r, maxSmallBody, &c, false); err != nil {
		writeErr(w, err)
		return
	}
	v, err := a.host.CreateVolume(r.Context(), c.Pool, c.Name, c.SizeGiB)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, v)
}

func (a *API) deleteVolume(w http.ResponseWriter, r *http.Request) {
	if err := a.host.DeleteVolume(r.URL.Query().Get("pool"), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"deleted": r.PathValue("name")})
}

// disk attaches (POST, a DISK device body) or detaches (DELETE,
// ?source=&storage_pool=) a disk: at once on a running VM (hot-plug).
func (a *API) disk(attach bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name, ok := a.vmName(w, r)
		if !ok {
			return
		}
		var d api.Device
		if attach {
			if _, err := decodeBody(w, r, maxSmallBody, &d, false); err != nil {
				writeErr(w, err)
				return
			}
			if d.DevType != "" && d.DevType != api.DevDisk {
				writeErr(w, errcode.New(errcode.ValidationFailed, "dev_type must be DISK"))
				return
			}
		} else {
			d = api.Device{Source: r.URL.Query().Get("source"), StoragePool: r.URL.Query().Get("storage_pool")}
		}
		if t, busy := a.cp.Busy(name); busy {
			writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", name, t.ID, t.Type))
			return
		}
		var v api.VM
		var err error
		if attach {
			v, err = a.host.AttachDisk(r.Context(), name, d)
		} else {
			v, err = a.host.DetachDisk(r.Context(), name, d)
		}
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
	}
}

// medium is POST /v1/vms/{name}/cdroms/{index}: a new medium for CD-ROM
// index ({"source": ...}, an allowed ISO or an image URL), or an eject
// ({"source": ""}).
func (a *API) medium(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	index, err := strconv.Atoi(r.PathValue("index"))
	if err != nil {
		writeErr(w, errcode.New(errcode.ValidationFailed, "CD-ROM index must be a number"))
		return
	}
	var d api.Device
	if _, err := decodeBody(w, r, maxSmallBody, &d, false); err != nil {
		writeErr(w, err)
		return
	}
	v, err := a.host.ChangeMedium(r.Context(), name, index, d)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}
