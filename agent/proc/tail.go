package proc

import (
	"io"
	"os"
	"strings"
)

// Tail returns what the log at path got after offset from, at most the
// last max bytes of it, as one line (runs of white space made one space):
// the few words a process said before it failed, for an error message.
func Tail(path string, from, max int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	if fi.Size()-from > max {
		from = fi.Size() - max
	}
	if from < 0 {
		from = 0
	}
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return ""
	}
	b, _ := io.ReadAll(f)
	return strings.Join(strings.Fields(string(b)), " ")
}
