package cloudinit

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sort"
	"unicode/utf8"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Position is a 1-based line and column (in characters) in a document.
type position struct{ line, col int }

func (p position) String() string {
	if p.col > 0 {
		return fmt.Sprintf("line %d, column %d", p.line, p.col)
	}
	return fmt.Sprintf("line %d", p.line)
}

func nodePos(n *yaml.Node) position { return position{n.Line, n.Column} }

// invalidAt returns a validation error for what (e.g. "user-data") at p.
func invalidAt(what string, p position, format string, args ...any) error {
	return errcode.New(errcode.ValidationFailed, "%s: %s: %s", what, p, fmt.Sprintf(format, args...))
}

func invalid(what, format string, args ...any) error {
	return errcode.New(errcode.ValidationFailed, "%s: %s", what, fmt.Sprintf(format, args...))
}

// posAt converts a byte offset in b to a position.
func posAt(b []byte, off int) position {
	line := 1 + bytes.Count(b[:off], []byte{'\n'})
	start := bytes.LastIndexByte(b[:off], '\n') + 1
	return position{line, 1 + utf8.RuneCount(b[start:off])}
}

// checkText reports the first byte sequence that no YAML parser accepts:
// invalid UTF-8, or a character outside YAML's printable set (C0 controls
// other than tab, LF and CR; DEL; C1 controls other than NEL; surrogates
// and U+FFFE/U+FFFF). yaml.v3 rejects these too, but without a position.
func checkText(what string, b []byte) error {
	for off := 0; off < len(b); {
		r, n := utf8.DecodeRune(b[off:])
		switch {
		case r == utf8.RuneError && n <= 1:
			return invalidAt(what, posAt(b, off), "invalid UTF-8")
		case !yamlPrintable(r):
			return invalidAt(what, posAt(b, off), "character %U is not allowed in YAML", r)
		}
		off += n
	}
	return nil
}

func yamlPrintable(r rune) bool {
	switch {
	case r == '\t' || r == '\n' || r == '\r':
		return true
	case r < 0x20 || r == 0x7f:
		return false
	case r >= 0x80 && r <= 0x9f:
		return r == 0x85
	case r >= 0xd800 && r <= 0xdfff, r == 0xfffe, r == 0xffff:
		return false
	}
	return true
}

// parseYAML parses b, which must hold at most one YAML document, and returns
// its root node, or nil for an empty document (comments only, or a lone
// null), which cloud-init reads as an empty mapping.
//
// Syntax errors are reported with the position where the document stops
// being valid YAML (see locateSyntaxError); yaml.v3's own line numbers
// point at the start of the enclosing block, or the line before it.
func parseYAML(what string, b []byte) (*yaml.Node, error) {
	if err := checkText(what, b); err != nil {
		return nil, err
	}
	docs, err := decodeAll(b, 2)
	if err != nil {
		msg := syntaxMessage(err)
		if len(b) > maxLocate {
			// Too big to search cheaply: yaml.v3's own, rougher, line.
			return nil, invalid(what, "invalid YAML: %s", err.Error()[len("yaml: "):])
		}
		if p, ok := locateSyntaxError(b, msg); ok {
			return nil, invalidAt(what, p, "invalid YAML: %s", msg)
		}
		return nil, invalid(what, "invalid YAML: %s", err.Error()[len("yaml: "):])
	}
	switch len(docs) {
	case 0:
		return nil, nil
	case 1:
	default:
		return nil, invalidAt(what, nodePos(docs[1]), "a second YAML document starts here; cloud-init reads exactly one")
	}
	root := docs[0]
	if len(root.Content) == 0 {
		return nil, nil
	}
	n := root.Content[0]
	if err := checkPyYAML(what, n); err != nil {
		return nil, err
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil, nil
	}
	return n, nil
}

// pyYAMLTags are the tags PyYAML's safe loader, which cloud-init uses,
// can construct; any other explicit tag makes it fail.
var pyYAMLTags = map[string]bool{
	"!!null": true, "!!bool": true, "!!int": true, "!!float": true, "!!str": true,
	"!!binary": true, "!!timestamp": true, "!!seq": true, "!!map": true,
	"!!omap": true, "!!pairs": true, "!!set": true, "!!merge": true,
}

// checkPyYAML rejects what parses as YAML but fails in cloud-init's
// loader (PyYAML safe_load): a list or mapping as a mapping key (a Python
// dict key must be hashable), an explicit tag it has no constructor for,
// and a merge key ("<<") whose value is not a mapping or a list of them.
// The value of an explicitly tagged scalar ("!!int x") is not checked:
// PyYAML reads those by YAML 1.1 rules ("!!int 1:30" is 90), yaml.v3 by
// 1.2, and a false rejection is worse than a miss. Aliases are not
// followed: their targets are checked where defined.
func checkPyYAML(what string, n *yaml.Node) error {
	if n.Style&yaml.TaggedStyle != 0 && !pyYAMLTags[n.ShortTag()] {
		return invalidAt(what, nodePos(n), "tag %s is not one cloud-init's YAML loader knows", n.ShortTag())
	}
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if dk := deref(k); dk != nil && dk.Kind != yaml.ScalarNode {
				return invalidAt(what, nodePos(k), "a mapping key must be a scalar, not %s", kindName(dk))
			}
			if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
				if err := checkMerge(what, v); err != nil {
					return err
				}
			}
		}
	}
	for _, c := range n.Content {
		if err := checkPyYAML(what, c); err != nil {
			return err
		}
	}
	return nil
}

func checkMerge(what string, v *yaml.Node) error {
	dv := deref(v)
	switch {
	case dv == nil:
	case dv.Kind == yaml.MappingNode:
		return nil
	case dv.Kind == yaml.SequenceNode:
		for _, item := range dv.Content {
			if di := deref(item); di == nil || di.Kind != yaml.MappingNode {
				return invalidAt(what, nodePos(item), "a merge (<<) list must hold only mappings")
			}
		}
		return nil
	}
	return invalidAt(what, nodePos(v), "a merge (<<) needs a mapping or a list of mappings")
}

// decodeAll decodes up to max documents. A panic inside the YAML parser is
// turned into an error: validation runs on untrusted input.
func decodeAll(b []byte, max int) (docs []*yaml.Node, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("yaml: parser failure: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(b))
	for len(docs) < max {
		var n yaml.Node
		if err := dec.Decode(&n); err != nil {
			if errors.Is(err, io.EOF) {
				return docs, nil
			}
			return nil, err
		}
		docs = append(docs, &n)
	}
	return docs, nil
}

// maxLocate bounds the documents locateSyntaxError searches: it costs a few
// dozen parses, about 45 ms for a 64 KiB document with an error near its
// end (BenchmarkValidateUserData).
const maxLocate = 1 << 20

var yamlLinePrefix = regexp.MustCompile(`^yaml: (line \d+: )?`)

// syntaxMessage strips yaml.v3's "yaml: line N: " prefix.
func syntaxMessage(err error) string {
	return yamlLinePrefix.ReplaceAllString(err.Error(), "")
}

// locateSyntaxError finds where b stops being valid YAML. A YAML parser
// stops at its first error, so once a prefix of b holds the faulty text,
// every longer prefix fails the same way while shorter ones do not (or fail
// differently, e.g. cut inside a quoted string). A binary search over whole
// lines, then over the characters of the faulty line, finds the shortest
// prefix that fails with the same message as the whole document: its end
// is where the parser gave up. It costs a few dozen parses, only on the
// error path.
func locateSyntaxError(b []byte, msg string) (position, bool) {
	failsSame := func(prefix []byte) bool {
		_, err := decodeAll(prefix, 1<<30)
		return err != nil && syntaxMessage(err) == msg
	}
	// lineEnds[i] is the offset just past line i+1 (including its '\n').
	var lineEnds []int
	for off := 0; off < len(b); {
		i := bytes.IndexByte(b[off:], '\n')
		if i < 0 {
			lineEnds = append(lineEnds, len(b))
			break
		}
		off += i + 1
		lineEnds = append(lineEnds, off)
	}
	if len(lineEnds) == 0 || !failsSame(b) {
		return position{}, false
	}
	li := sort.Search(len(lineEnds), func(i int) bool { return failsSame(b[:lineEnds[i]]) })
	if li == len(lineEnds) {
		return position{}, false
	}
	start := 0
	if li > 0 {
		start = lineEnds[li-1]
	}
	line := b[start:lineEnds[li]]
	// Offsets of each character boundary within the line, after the first
	// character: cutting after character k (k >= 1).
	var cuts []int
	for off := 0; off < len(line); {
		_, n := utf8.DecodeRune(line[off:])
		off += n
		cuts = append(cuts, off)
	}
	ci := sort.Search(len(cuts), func(i int) bool { return failsSame(b[:start+cuts[i]]) })
	p := position{line: li + 1}
	if ci < len(cuts) {
		p.col = ci + 1
	}
	return p, true
}

// kindName names a node's kind for an error message.
func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!null":
			return "null"
		case "!!str":
			return "a string"
		case "!!int", "!!float":
			return "a number"
		case "!!bool":
			return "a boolean"
		}
		return "a scalar"
	case yaml.AliasNode:
		return "an alias"
	}
	return "something else"
}

// deref follows aliases (a bounded number of hops: yaml.v3 rejects cycles,
// but this stays safe regardless).
func deref(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && i < 100; i++ {
		n = n.Alias
	}
	return n
}

// mapPairs returns a mapping node's key/value pairs with aliases resolved.
func mapPairs(n *yaml.Node) [][2]*yaml.Node {
	pairs := make([][2]*yaml.Node, 0, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		pairs = append(pairs, [2]*yaml.Node{deref(n.Content[i]), deref(n.Content[i+1])})
	}
	return pairs
}

// lookup returns the value for a string key in a mapping node.
func lookup(n *yaml.Node, key string) (k, v *yaml.Node) {
	for _, kv := range mapPairs(n) {
		if kv[0] != nil && kv[0].Kind == yaml.ScalarNode && kv[0].Value == key {
			return kv[0], kv[1]
		}
	}
	return nil, nil
}
