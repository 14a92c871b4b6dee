package standalone

import (
	"bufio"
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
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
)

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
