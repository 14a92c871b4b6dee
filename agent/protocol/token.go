package protocol

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// ErrInsecureTokenFile is returned for a token file that group or others
// may read or write.
var ErrInsecureTokenFile = errors.New("token file is accessible to group or others")

// tokenFile reads the bearer token from a file and reads it again when the
// file changes (rotation) or the control plane refused it.
type tokenFile struct {
	path string

	mu      sync.Mutex
	token   string
	modTime time.Time
	size    int64
}

func (t *tokenFile) get() (string, error) {
	fi, err := os.Stat(t.path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token != "" && fi.ModTime().Equal(t.modTime) && fi.Size() == t.size {
		return t.token, nil
	}
	tok, fi, err := readToken(t.path)
	if err != nil {
		return "", err
	}
	t.token, t.modTime, t.size = tok, fi.ModTime(), fi.Size()
	return tok, nil
}

func (t *tokenFile) invalidate() {
	t.mu.Lock()
	t.token = ""
	t.mu.Unlock()
}

// readToken opens the file once and checks the mode of what it opened, so
// a swap between the check and the read cannot slip through.
func readToken(path string) (string, os.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", nil, fmt.Errorf("token file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", nil, fmt.Errorf("token file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", nil, fmt.Errorf("token file %s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", nil, fmt.Errorf("token file %s has mode %04o, want 0600 or stricter (chmod 600 %s): %w", path, perm, path, ErrInsecureTokenFile)
	}
	data, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return "", nil, fmt.Errorf("token file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", nil, fmt.Errorf("token file %s is empty", path)
	}
	if strings.ContainsAny(tok, "\r\n") {
		return "", nil, fmt.Errorf("token file %s: token spans several lines", path)
	}
	return tok, fi, nil
}
