package cloudinit

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/textproto"
	"net/url"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// The kinds of user-data cloud-init recognises by their first line
// (cloudinit/handlers: type_from_starts_with). cloud-init lower-cases the
// data and strips leading whitespace before matching, and tries the longest
// prefix first, so "#cloud-config-archive" is not "#cloud-config".
// "#upstart-job" is left out: cloud-init dropped upstart support. The jinja
// header is handled apart: it wraps one of these.
var userDataPrefixes = []struct {
	prefix string
	check  func(what string, b []byte) error
}{
	{"#cloud-config-archive", checkCloudConfigArchive},
	{"#cloud-config-jsonp", checkCloudConfigJSONP},
	{"#cloud-boothook", nil},
	{"#include-once", checkInclude},
	{"#part-handler", nil},
	{"#cloud-config", checkCloudConfig},
	{"#include", checkInclude},
	{"#!", nil},
}

const (
	gzipMagic = "\x1f\x8b"
	utf8BOM   = "\xef\xbb\xbf"
	// cloud-init parses user-data as MIME when "mime-version:" appears in
	// its first 4096 bytes (cloudinit/user_data.py: convert_string).
	mimeSniffLen = 4096
)

// ValidateUserData checks that b is user-data cloud-init acts on, and no
// larger than l allows. Accepted as given:
//
//   - "#cloud-config": YAML that parses to a mapping (or is empty);
//   - "#!" scripts, "#cloud-boothook" and "#part-handler" (opaque);
//   - "#include" and "#include-once": one URL per line;
//   - "#cloud-config-archive": a YAML list; "#cloud-config-jsonp": a JSON
//     list (a JSON patch);
//   - MIME multipart (a MIME-Version header and a multipart/* Content-Type
//     whose parts parse; text/cloud-config parts are checked like
//     #cloud-config, after undoing base64 or quoted-printable);
//   - "## template: jinja" as the first line, followed by one of the
//     headers above (the rest is a template, so it is not parsed);
//   - gzip-compressed data (magic 1f 8b), accepted as opaque: the size
//     limit applies to the compressed bytes.
//
// cloud-init matches headers case-insensitively after leading whitespace,
// and so does this. Anything else cloud-init would log and ignore, so it is
// rejected with errcode.ValidationFailed, and the reason. YAML errors give
// "line L, column C". Messages never quote the data.
func ValidateUserData(b []byte, l Limits) error {
	return validateUserDataAs("user-data", b, l)
}

func validateUserDataAs(what string, b []byte, l Limits) error {
	if max := l.maxUserData(); len(b) > max {
		return invalid(what, "%d bytes is over the limit of %d bytes", len(b), max)
	}
	if len(b) == 0 {
		return invalid(what, "empty document")
	}
	if bytes.HasPrefix(b, []byte(gzipMagic)) {
		return nil
	}
	if bytes.HasPrefix(b, []byte(utf8BOM)) {
		return invalid(what, "starts with a UTF-8 byte order mark, which hides its header from cloud-init; save it without BOM")
	}
	if looksLikeMIME(b) {
		return checkMIME(what, b)
	}
	return checkByHeader(what, b)
}

// checkByHeader dispatches on the first line, as cloud-init does.
func checkByHeader(what string, b []byte) error {
	lc := bytes.ToLower(bytes.TrimLeft(b, " \t\r\n\v\f"))
	if bytes.HasPrefix(lc, []byte(jinjaPrefix)) {
		return checkJinja(what, b)
	}
	for _, k := range userDataPrefixes {
		if !bytes.HasPrefix(lc, []byte(k.prefix)) {
			continue
		}
		if k.check == nil {
			return nil
		}
		return k.check(what, b)
	}
	if docs, err := decodeAll(b, 1); err == nil && len(docs) == 1 && len(docs[0].Content) == 1 &&
		docs[0].Content[0].Kind == yaml.MappingNode {
		return invalid(what, "YAML without a #cloud-config first line: cloud-init ignores it; add the header")
	}
	return invalid(what, "not a format cloud-init recognises: the first line must be #cloud-config, "+
		"a #! script, #include, #cloud-boothook, #part-handler, #cloud-config-archive, "+
		"## template: jinja, a MIME multipart message, or gzip data")
}

func checkCloudConfig(what string, b []byte) error {
	n, err := parseYAML(what, b)
	if err != nil || n == nil {
		return err
	}
	if n.Kind != yaml.MappingNode {
		return invalidAt(what, nodePos(n), "#cloud-config must be a YAML mapping (key: value), got %s", kindName(n))
	}
	return nil
}

func checkCloudConfigArchive(what string, b []byte) error {
	n, err := parseYAML(what, b)
	if err != nil || n == nil {
		return err
	}
	if n.Kind != yaml.SequenceNode {
		return invalidAt(what, nodePos(n), "#cloud-config-archive must be a YAML list, got %s", kindName(n))
	}
	for _, item := range n.Content {
		item = deref(item)
		if item.Kind != yaml.MappingNode && item.Kind != yaml.ScalarNode {
			return invalidAt(what, nodePos(item), "#cloud-config-archive entries must be mappings or strings, got %s", kindName(item))
		}
	}
	return nil
}

func checkCloudConfigJSONP(what string, b []byte) error {
	// cloud-init strips the header and loads the rest as a JSON patch
	// (cloudinit/handlers/cloud_config.py: _merge_patch).
	lead := len(b) - len(bytes.TrimLeft(b, " \t\r\n\v\f"))
	start := lead + len("#cloud-config-jsonp")
	var patch []json.RawMessage
	if err := json.Unmarshal(b[start:], &patch); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			off := start + int(se.Offset)
			if off > 0 {
				off-- // Offset counts the bad byte itself
			}
			return invalidAt(what, posAt(b, min(off, len(b))), "#cloud-config-jsonp: invalid JSON: %s", se.Error())
		}
		return invalid(what, "#cloud-config-jsonp must be a JSON list (a JSON patch)")
	}
	return nil
}

// checkInclude accepts one URL per line, as cloudinit/user_data.py
// _do_include reads them: blank and '#' lines are skipped, a line may
// itself start with #include or #include-once.
func checkInclude(what string, b []byte) error {
	for i, line := range strings.Split(string(b), "\n") {
		s := strings.TrimLeft(line, " \t\r\v\f")
		lc := strings.ToLower(s)
		switch {
		case strings.HasPrefix(lc, "#include-once"):
			s = s[len("#include-once"):]
		case strings.HasPrefix(lc, "#include"):
			s = s[len("#include"):]
		}
		s = strings.TrimSpace(s)
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		if !isIncludeURL(s) {
			return invalidAt(what, position{line: i + 1}, "#include lines must be absolute URLs (http, https, ftp, file) or absolute paths")
		}
	}
	return nil
}

func isIncludeURL(s string) bool {
	if strings.ContainsAny(s, " \t") {
		return false
	}
	if strings.HasPrefix(s, "/") {
		return true
	}
	u, err := url.Parse(s)
	if err != nil {
		return false
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https", "ftp", "ftps":
		return u.Host != ""
	case "file":
		return u.Path != ""
	}
	return false
}

const jinjaPrefix = "## template: jinja"

var jinjaHeader = regexp.MustCompile(`(?i)^##\s*template:\s*jinja\s*$`)

// checkJinja accepts "## template: jinja" followed by a header cloud-init
// dispatches on once the template is rendered. The body is a template, so
// it is not parsed: "{{ ds.meta_data.x }}" is not YAML.
func checkJinja(what string, b []byte) error {
	s := bytes.TrimLeft(b, " \t\r\n\v\f")
	line := posAt(b, len(b)-len(s)).line
	first, rest, _ := bytes.Cut(s, []byte("\n"))
	if !jinjaHeader.Match(bytes.TrimRight(first, "\r")) {
		return invalidAt(what, position{line: line}, `the jinja header line must be exactly "## template: jinja"`)
	}
	if len(bytes.TrimSpace(rest)) == 0 {
		return invalid(what, "## template: jinja must be followed by the template")
	}
	body := bytes.TrimLeft(rest, " \t\r\n\v\f")
	lc := bytes.ToLower(body)
	for _, k := range userDataPrefixes {
		if bytes.HasPrefix(lc, []byte(k.prefix)) {
			return nil
		}
	}
	return invalidAt(what, position{line: posAt(b, len(b)-len(body)).line}, "a jinja template must render to user-data cloud-init recognises: "+
		"the line after the jinja header must be #cloud-config, a #! script, #include, #cloud-boothook or #part-handler")
}

// looksLikeMIME reports whether b starts like a MIME message: a header
// field first, and that field MIME-Version or Content-*, or a MIME-Version
// field within the first 4096 bytes, where cloud-init looks for one
// (cloudinit/user_data.py: convert_string).
func looksLikeMIME(b []byte) bool {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	name, _, ok := bytes.Cut(line, []byte(":"))
	if !ok || len(name) == 0 {
		return false
	}
	for _, c := range name {
		if c <= ' ' || c > '~' { // RFC 5322 field name
			return false
		}
	}
	name = bytes.ToLower(name)
	return string(name) == "mime-version" || bytes.HasPrefix(name, []byte("content-")) || hasMIMEVersion(b)
}

func hasMIMEVersion(b []byte) bool {
	return bytes.Contains(bytes.ToLower(b[:min(len(b), mimeSniffLen)]), []byte("mime-version:"))
}

// partBody reads a part, undoing a base64 or quoted-printable transfer
// encoding.
func partBody(p *multipart.Part) ([]byte, error) {
	var r io.Reader = p
	switch strings.ToLower(strings.TrimSpace(p.Header.Get("Content-Transfer-Encoding"))) {
	case "base64":
		r = base64.NewDecoder(base64.StdEncoding, p)
	case "quoted-printable":
		r = quotedprintable.NewReader(p)
	}
	return io.ReadAll(r)
}

// checkMIME validates a MIME multipart message: cloud-init must see it as
// MIME (a MIME-Version header in the first 4096 bytes), its Content-Type
// must be multipart/* with a boundary, and every part must parse.
func checkMIME(what string, b []byte) error {
	if !hasMIMEVersion(b) {
		return invalid(what, "looks like a MIME message but has no MIME-Version header; cloud-init would not read it as MIME")
	}
	r := textproto.NewReader(bufio.NewReader(bytes.NewReader(b)))
	hdr, err := r.ReadMIMEHeader()
	if err != nil {
		// textproto errors quote the offending line: do not pass them on.
		return invalid(what, "malformed MIME header")
	}
	ct := hdr.Get("Content-Type")
	if ct == "" {
		return invalid(what, "MIME message has no Content-Type header")
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return invalid(what, "MIME Content-Type header does not parse: %v", err)
	}
	if !strings.HasPrefix(mt, "multipart/") {
		return invalid(what, "MIME user-data must be multipart/*, got %s", mt)
	}
	boundary := params["boundary"]
	if boundary == "" {
		return invalid(what, "multipart Content-Type has no boundary")
	}
	mr := multipart.NewReader(r.R, boundary)
	parts := 0
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return invalid(what, "MIME part %d does not parse", parts+1)
		}
		parts++
		body, err := partBody(p)
		if err != nil {
			return invalid(what, "MIME part %d does not parse", parts)
		}
		// A cloud-config part is YAML that cloud-init loads as is (no
		// header needed); check it like a #cloud-config document.
		if pt, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type")); pt == "text/cloud-config" {
			if err := checkCloudConfig(fmt.Sprintf("%s MIME part %d", what, parts), body); err != nil {
				return err
			}
		}
	}
	if parts == 0 {
		return invalid(what, "MIME multipart message has no parts (is the boundary right?)")
	}
	return nil
}
