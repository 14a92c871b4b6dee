package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// imageFake serves the image API the CLI speaks: GET /v1/images and
// POST /v1/images, whose image.pull tasks report the Steps as progress,
// one per poll, then succeed and add the image. Usable from its zero
// value.
type imageFake struct {
	Steps []api.Progress
	// Fail makes pulls end failed with this error.
	Fail *api.Error
	// Digest is the digest of pulled images without a sha256.
	Digest string

	mu     sync.Mutex
	images []imageInfo
	tasks  map[string]*imagePullTask
	pulls  []pullImage
	reqs   []string // "METHOD path?query"
	auth   []string
}

type imagePullTask struct {
	task  api.Task
	req   pullImage
	polls int
}

func (f *imageFake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	line := r.Method + " " + r.URL.Path
	if r.URL.RawQuery != "" {
		line += "?" + r.URL.RawQuery
	}
	f.reqs = append(f.reqs, line)
	f.auth = append(f.auth, r.Header.Get("Authorization"))
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/v1/images":
		out := []imageInfo{}
		for _, im := range f.images {
			if p := r.URL.Query().Get("pool"); p == "" || p == im.Pool {
				out = append(out, im)
			}
		}
		fakeJSON(w, http.StatusOK, imageList{Images: out})
	case r.Method == http.MethodPost && r.URL.Path == "/v1/images":
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		var req pullImage
		if err := dec.Decode(&req); err != nil || req.URL == "" || req.Pool == "" {
			fakeErr(w, http.StatusBadRequest, "validation_failed", fmt.Sprintf("bad pull request: %v", err))
			return
		}
		if req.Pool != "default" && req.Pool != "fast" {
			fakeErr(w, http.StatusNotFound, "pool_not_found", fmt.Sprintf("pool %q is not configured", req.Pool))
			return
		}
		f.pulls = append(f.pulls, req)
		if f.tasks == nil {
			f.tasks = map[string]*imagePullTask{}
		}
		id := fmt.Sprintf("task-%d", len(f.tasks)+1)
		pt := &imagePullTask{task: api.Task{ID: id, Type: taskImagePull, Status: api.TaskPending}, req: req}
		f.tasks[id] = pt
		fakeJSON(w, http.StatusAccepted, pt.task)
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v1/tasks/"):
		pt := f.tasks[strings.TrimPrefix(r.URL.Path, "/v1/tasks/")]
		if pt == nil {
			fakeErr(w, http.StatusNotFound, "not_found", "task not found")
			return
		}
		if pt.polls < len(f.Steps) {
			p := f.Steps[pt.polls]
			pt.task.Status, pt.task.Progress = api.TaskRunning, &p
		} else if pt.task.Status == api.TaskPending || pt.task.Status == api.TaskRunning {
			pt.task.Progress = nil
			if f.Fail != nil {
				pt.task.Status, pt.task.Error = api.TaskFailed, f.Fail
			} else {
				pt.task.Status = api.TaskSuccess
				d := pt.req.SHA256
				if d == "" {
					d = f.Digest
				}
				f.images = append(f.images, imageInfo{Pool: pt.req.Pool, Digest: d, Format: "qcow2", URLs: []string{pt.req.URL}, LastUsed: time.Now()})
			}
		}
		pt.polls++
		fakeJSON(w, http.StatusOK, pt.task)
	default:
		http.NotFound(w, r)
	}
}

func (f *imageFake) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.reqs...)
}

// runImage runs an image command of c.imageCommands() the way dispatch
// runs a command (its own flag set with the global flags) and turns the
// error into an exit status and stderr as main does.
func runImage(t *testing.T, srvURL string, stderr io.Writer, args ...string) (int, string) {
	t.Helper()
	var out bytes.Buffer
	env := map[string]string{envURL: srvURL, envPollInterval: "1ms", envToken: "tok", "TERM": "xterm"}
	c := &cli{
		stdin: strings.NewReader(""), stdout: &out, stderr: stderr,
		env:        func(k string) string { return env[k] },
		isTerminal: func(io.Reader) bool { return false },
	}
	path := "image " + args[0]
	for _, cmd := range c.imageCommands() {
		if cmd.path != path {
			continue
		}
		fs := flag.NewFlagSet(cmd.path, flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.globalFlags(fs)
		err := cmd.run(t.Context(), fs, args[1:])
		var ee *exitError
		var ue *usageError
		switch {
		case err == nil:
			return exitOK, out.String()
		case errors.As(err, &ee):
			if ee.msg != "" {
				fmt.Fprintln(stderr, ee.msg)
			}
			return ee.code, out.String()
		case errors.As(err, &ue):
			fmt.Fprintln(stderr, "error: "+err.Error())
			fmt.Fprintln(stderr, "usage: "+ue.synopsis)
			return exitFailure, out.String()
		}
		fmt.Fprintln(stderr, "error: "+err.Error())
		return exitFailure, out.String()
	}
	t.Fatalf("no command %q", path)
	return 0, ""
}

func newImageFake(t *testing.T) (*imageFake, string) {
	f := &imageFake{Digest: strings.Repeat("cd", 32)}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

func TestImageList(t *testing.T) {
	f, url := newImageFake(t)
	used := time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
	f.images = []imageInfo{
		{Pool: "default", Digest: strings.Repeat("ab", 32), Format: "qcow2", Size: 300 << 20, VirtualSize: 2 << 30,
			URLs: []string{"https://img.example/deb.qcow2", "https://mirror.example/deb.qcow2"}, LastUsed: used, PinnedBy: []string{"web-1", "web-2"}},
		{Pool: "fast", Digest: strings.Repeat("01", 32), Format: "raw", Size: 1 << 30, VirtualSize: 1 << 30},
	}
	var stderr bytes.Buffer
	code, stdout := runImage(t, url, &stderr, "list")
	want := `POOL     DIGEST               FORMAT  SIZE       VIRTUAL  LAST USED         PINNED  URL
default  sha256:abababababab  qcow2   300.0 MiB  2.0 GiB  2025-03-04 05:06  2       https://img.example/deb.qcow2 (+1)
fast     sha256:010101010101  raw     1.0 GiB    1.0 GiB  -                 0       -
`
	if code != 0 || stdout != want || stderr.Len() != 0 {
		t.Errorf("exit %d stderr %q stdout\n%s\nwant\n%s", code, stderr.String(), stdout, want)
	}

	code, stdout = runImage(t, url, &stderr, "list", "--pool", "fast", "-o", "json")
	var l imageList
	if err := json.Unmarshal([]byte(stdout), &l); code != 0 || err != nil || len(l.Images) != 1 || l.Images[0].Pool != "fast" {
		t.Errorf("json: exit %d err %v list %+v\n%s", code, err, l, stdout)
	}
	reqs := f.requests()
	if len(reqs) != 2 || reqs[0] != "GET /v1/images" || reqs[1] != "GET /v1/images?pool=fast" {
		t.Errorf("requests = %q", reqs)
	}
	if f.auth[0] != "Bearer tok" {
		t.Errorf("Authorization = %q, want the token", f.auth[0])
	}
}

func TestImageAPIMissing(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(srv.Close)
	var stderr bytes.Buffer
	code, _ := runImage(t, srv.URL, &stderr, "list")
	if want := "error: not_found: the server has no image API (/v1/images): upgrade otherix-agent\n"; code != 1 || stderr.String() != want {
		t.Errorf("exit %d stderr %q, want 1 %q", code, stderr.String(), want)
	}
}

func TestImagePull(t *testing.T) {
	const u = "https://img.example/deb.qcow2"
	steps := []api.Progress{{Phase: "download", Done: 0, Total: 4 << 20}, {Phase: "download", Done: 2 << 20, Total: 4 << 20}, {Phase: "download", Done: 4 << 20, Total: 4 << 20}}
	digest := strings.Repeat("cd", 32)

	t.Run("pipe", func(t *testing.T) {
		f, url := newImageFake(t)
		f.Steps = steps
		stderr := &ttyBuffer{}
		code, stdout := runImage(t, url, stderr, "pull", u, "--pool", "default")
		want := "pull task=task-1 status=pending\nimage pulled pool=default digest=sha256:" + digest + " task=task-1\n"
		if code != 0 || stdout != want {
			t.Errorf("exit %d stdout %q, want %q", code, stdout, want)
		}
		if stderr.String() != "....\n" { // three progress polls and the last
			t.Errorf("stderr = %q, want dots", stderr.String())
		}
		if len(f.pulls) != 1 || f.pulls[0] != (pullImage{URL: u, Pool: "default"}) {
			t.Errorf("pulls = %+v", f.pulls)
		}
		reqs := f.requests()
		if reqs[0] != "POST /v1/images" || reqs[len(reqs)-1] != "GET /v1/images?pool=default" {
			t.Errorf("requests = %q", reqs)
		}
	})

	t.Run("terminal", func(t *testing.T) {
		f, url := newImageFake(t)
		f.Steps = steps
		stderr := &ttyBuffer{tty: true}
		code, _ := runImage(t, url, stderr, "pull", u, "--pool", "fast", "--sha256", "sha256:"+strings.ToUpper(digest))
		frames := strings.Split(stderr.String(), "\r\x1b[K")
		if code != 0 || len(frames) != 4 || frames[0] != "" ||
			frames[1] != "download [------------------------]   0%  0 B / 4.0 MiB" ||
			!strings.HasPrefix(frames[2], "download [############------------]  50%  2.0 MiB / 4.0 MiB  ") ||
			!strings.HasPrefix(frames[3], "download [########################] 100%  4.0 MiB / 4.0 MiB  ") ||
			!strings.HasSuffix(frames[3], "/s\n") {
			t.Errorf("exit %d stderr %q", code, stderr.String())
		}
		if len(f.pulls) != 1 || f.pulls[0].SHA256 != digest {
			t.Errorf("pulls = %+v, want the sha256 lowercased without its prefix", f.pulls)
		}
		for _, r := range f.requests() {
			if strings.HasPrefix(r, "GET /v1/images") {
				t.Errorf("listed images (%s) although the digest was given", r)
			}
		}
	})

	t.Run("no wait", func(t *testing.T) {
		f, url := newImageFake(t)
		var stderr bytes.Buffer
		code, stdout := runImage(t, url, &stderr, "pull", "--no-wait", u, "--pool", "default")
		if code != 0 || stdout != "pull task=task-1 status=pending\n" || stderr.Len() != 0 || len(f.requests()) != 1 {
			t.Errorf("exit %d stdout %q stderr %q requests %q", code, stdout, stderr.String(), f.requests())
		}
	})

	t.Run("failed", func(t *testing.T) {
		f, url := newImageFake(t)
		f.Fail = &api.Error{Code: "image_checksum_mismatch", Message: "image has sha256 x, expected y"}
		var stderr bytes.Buffer
		code, _ := runImage(t, url, &stderr, "pull", u, "--pool", "default")
		if want := ".\ntask task-1 failed: image_checksum_mismatch: image has sha256 x, expected y\n"; code != 1 || stderr.String() != want {
			t.Errorf("exit %d stderr %q, want %q", code, stderr.String(), want)
		}
	})

	t.Run("unknown pool", func(t *testing.T) {
		_, url := newImageFake(t)
		var stderr bytes.Buffer
		code, stdout := runImage(t, url, &stderr, "pull", u, "--pool", "nope")
		if want := "error: pool_not_found: pool \"nope\" is not configured\n"; code != 1 || stderr.String() != want || stdout != "" {
			t.Errorf("exit %d stdout %q stderr %q", code, stdout, stderr.String())
		}
	})

	t.Run("timeout", func(t *testing.T) {
		f, url := newImageFake(t)
		f.Steps = make([]api.Progress, 1<<20) // never finishes
		var stderr bytes.Buffer
		code, _ := runImage(t, url, &stderr, "pull", u, "--pool", "default", "--wait-timeout", "20ms")
		if code != exitTimeout || !strings.Contains(stderr.String(), "timed out after 20ms waiting for task task-1") {
			t.Errorf("exit %d stderr %q", code, stderr.String())
		}
	})
}

func TestImagePullUsage(t *testing.T) {
	f, url := newImageFake(t)
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"pull", "--pool", "default"}, "missing image URL"},
		{[]string{"pull", "https://x/a.img"}, "--pool is required"},
		{[]string{"pull", "https://x/a.img", "b", "--pool", "p"}, "unexpected arguments after the URL: b"},
		{[]string{"pull", "https://x/a.img", "--pool", "p", "--sha256", "abc"}, `--sha256 must be 64 hex digits, got "abc"`},
		{[]string{"pull", "https://x/a.img", "--pool", "p", "--wait-timeout", "0s"}, "--wait-timeout must be positive"},
		{[]string{"list", "extra"}, "unexpected arguments: extra"},
		{[]string{"list", "-o", "yaml"}, `unknown output format "yaml"`},
	} {
		var stderr bytes.Buffer
		code, stdout := runImage(t, url, &stderr, tc.args...)
		if code != 1 || stdout != "" || !strings.HasPrefix(stderr.String(), "error: "+tc.msg) {
			t.Errorf("%v: exit %d stdout %q stderr %q, want error: %s", tc.args, code, stdout, stderr.String(), tc.msg)
		}
	}
	if r := f.requests(); len(r) != 0 {
		t.Errorf("usage errors sent requests: %q", r)
	}
}
