package testguest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func appendFile(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestConsoleFollowsFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	c := OpenConsole(path) // the file does not exist yet
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done, cancelled := context.WithCancel(context.Background())
	cancelled()

	type result struct {
		line string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		line, err := c.WaitFor(ctx, "second")
		ch <- result{line, err}
	}()
	appendFile(t, path, "first\r\n")
	appendFile(t, path, "sec")
	appendFile(t, path, "ond line\r\nthird")
	r := <-ch
	if r.err != nil || r.line != "second line" {
		t.Fatalf("WaitFor(second) = %q, %v; want %q", r.line, r.err, "second line")
	}
	if got, want := c.Lines(), []string{"first", "second line"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Lines() = %q, want %q (the unfinished line is not one)", got, want)
	}

	// "first" is behind the read position: not found, and the error tells why.
	if _, err := c.WaitFor(done, "first"); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitFor(first) after the position: err = %v, want context.Canceled", err)
	}
	c.Seek(0)
	if line, err := c.WaitFor(done, "first"); err != nil || line != "first" {
		t.Errorf("after Seek(0), WaitFor(first) = %q, %v", line, err)
	}
	if got := c.Pos(); got != 1 {
		t.Errorf("Pos() = %d, want 1", got)
	}

	// A failed wait leaves the position: "third" is still found after it.
	if _, err := c.WaitFor(done, "absent"); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitFor(absent) err = %v, want context.Canceled", err)
	}
	if got := c.Pos(); got != 1 {
		t.Errorf("Pos() after a failed wait = %d, want 1", got)
	}
	appendFile(t, path, " line\n")
	if line, err := c.WaitFor(ctx, "third"); err != nil || line != "third line" {
		t.Errorf("WaitFor(third) = %q, %v", line, err)
	}
	c.Seek(2)
	c.Mark()
	if _, err := c.WaitFor(done, "third"); err == nil {
		t.Errorf("WaitFor found a line written before Mark")
	}
	appendFile(t, path, "fourth\n")
	if line, err := c.WaitFor(ctx, "our"); err != nil || line != "fourth" {
		t.Errorf("WaitFor(our) = %q, %v", line, err)
	}

	// A new writer truncates the file: reading starts over.
	if err := os.WriteFile(path, []byte("new\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if line, err := c.WaitFor(ctx, "new"); err != nil || line != "new" {
		t.Errorf("after truncation, WaitFor(new) = %q, %v", line, err)
	}
	want := "first\nsecond line\nthird line\nfourth\nnew\n"
	if got := c.Text(); got != want {
		t.Errorf("Text() = %q, want %q", got, want)
	}
}

func TestConsoleFileReplaced(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	appendFile(t, path, "old\n")
	c := OpenConsole(path)
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.WaitFor(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	ch := make(chan error, 1)
	go func() {
		_, err := c.WaitFor(ctx, "replacement")
		ch <- err
	}()
	tmp := filepath.Join(dir, "tmp")
	appendFile(t, tmp, "replacement\n")
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err != nil {
		t.Fatalf("WaitFor after the file was replaced: %v", err)
	}
}

func TestParseMarkers(t *testing.T) {
	text := "SeaBIOS noise\r\n" +
		"OTHERIX-GUEST booted arch=amd64 kernel=6.1.0-56-cloud-amd64\r\n" +
		"\x1b[2JOTHERIX-GUEST cidata label=cidata dev=sr0\n" +
		"OTHERIX-GUEST cidata files=meta-data,user-data\n" +
		"OTHERIX-GUEST ready\n" +
		"hello\n" +
		"OTHERIX-GUEST tick 1\n" +
		"OTHERIX-GUEST tick 2\n" +
		"OTHERIX-GUEST \n"
	got := ParseMarkers(text)
	want := map[string][]string{
		"booted": {"arch=amd64 kernel=6.1.0-56-cloud-amd64"},
		"cidata": {"label=cidata dev=sr0", "files=meta-data,user-data"},
		"ready":  {""},
		"tick":   {"1", "2"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseMarkers = %q\nwant %q", got, want)
	}
	if got, want := Fields(got["booted"][0]), map[string]string{"arch": "amd64", "kernel": "6.1.0-56-cloud-amd64"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Fields = %q, want %q", got, want)
	}
}
