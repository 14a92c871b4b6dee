package config

import (
	"bufio"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// docRow is one row of docs/config.md's key table: the keys it names (in
// full), its default column's values and its meaning.
type docRow struct {
	keys     []string
	defaults []string
	meaning  string
}

var backticked = regexp.MustCompile("`([^`]*)`")

// readDocRows reads the key table of docs/config.md. A row may name
// several keys ("`control_plane.cert_file`, `key_file`"): a key without a
// dot after one with a dot shares that one's parent.
func readDocRows(t *testing.T) []docRow {
	t.Helper()
	f, err := os.Open("../../docs/config.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var rows []docRow
	in := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "| key | default | meaning |") {
			in = true
			continue
		}
		if !in || strings.HasPrefix(line, "| ---") {
			continue
		}
		if !strings.HasPrefix(line, "|") {
			break
		}
		cells := strings.Split(strings.Trim(line, "|"), " | ")
		if len(cells) < 3 {
			t.Fatalf("docs/config.md: a table row without three cells: %q", line)
		}
		var r docRow
		parent := ""
		for _, m := range backticked.FindAllStringSubmatch(cells[0], -1) {
			k := m[1]
			if strings.Contains(k, ".") {
				parent = k[:strings.LastIndex(k, ".")+1]
			} else {
				k = parent + k
			}
			r.keys = append(r.keys, k)
		}
		if strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			for _, m := range backticked.FindAllStringSubmatch(cells[1], -1) {
				r.defaults = append(r.defaults, m[1])
			}
		}
		r.meaning = strings.Join(cells[2:], " | ")
		rows = append(rows, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(rows) == 0 {
		t.Fatal("docs/config.md: no key table found")
	}
	return rows
}

// codeKeys walks Config's yaml tags: every leaf key in full, and for a
// map of structs (pools, networks) the map's key with its entries' fields.
func codeKeys(typ reflect.Type, prefix string, leaves map[string][]string) {
	for i := range typ.NumField() {
		f := typ.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if tag == "" || tag == "-" {
			continue
		}
		key := prefix + tag
		switch ft := f.Type; {
		case ft.Kind() == reflect.Struct:
			codeKeys(ft, key+".", leaves)
		case ft.Kind() == reflect.Map && ft.Elem().Kind() == reflect.Struct:
			var sub []string
			for j := range ft.Elem().NumField() {
				st, _, _ := strings.Cut(ft.Elem().Field(j).Tag.Get("yaml"), ",")
				sub = append(sub, st)
			}
			leaves[key] = sub
		default:
			leaves[key] = nil
		}
	}
}

// TestDocsListEveryKey holds docs/config.md to the code: every key the
// config file accepts is documented, every documented key is accepted,
// and a pool's or network's fields are named in its row.
func TestDocsListEveryKey(t *testing.T) {
	code := map[string][]string{}
	codeKeys(reflect.TypeOf(Config{}), "", code)
	docs := map[string]docRow{}
	for _, r := range readDocRows(t) {
		for _, k := range r.keys {
			if _, dup := docs[k]; dup {
				t.Errorf("docs/config.md lists %s twice", k)
			}
			docs[k] = r
		}
	}
	for _, k := range sortedKeys(code) {
		r, ok := docs[k]
		if !ok {
			t.Errorf("config key %s is not in docs/config.md", k)
			continue
		}
		for _, sub := range code[k] {
			if !regexp.MustCompile(`\b` + regexp.QuoteMeta(sub) + `\b`).MatchString(r.meaning) {
				t.Errorf("docs/config.md, %s: the entries' field %s is not named", k, sub)
			}
		}
	}
	for _, k := range sortedKeys(docs) {
		if _, ok := code[k]; !ok {
			t.Errorf("docs/config.md lists %s, which the config does not accept", k)
		}
	}
}

// TestDocsDefaults sets each key to the default docs/config.md gives it
// and checks the result is the built-in default configuration.
func TestDocsDefaults(t *testing.T) {
	base, err := Parse(nil, "empty.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want, err := yaml.Marshal(base)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, r := range readDocRows(t) {
		if len(r.defaults) != len(r.keys) {
			continue // "none", "the host name", ...: no value to set
		}
		for i, k := range r.keys {
			v := r.defaults[i]
			if strings.Contains(v, "<") {
				continue // a default computed from another key
			}
			doc := nestedYAML(k, v)
			c, err := Parse([]byte(doc), "doc.yaml")
			if err != nil {
				t.Errorf("%s: %v", k, err)
				continue
			}
			got, err := yaml.Marshal(c)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != string(want) {
				t.Errorf("%s: %s, the documented default, is not the built-in default", k, v)
			}
			checked++
		}
	}
	if checked < 30 {
		t.Errorf("only %d documented defaults checked: is the table's default column still backticked?", checked)
	}
}

// nestedYAML turns "a.b.c" and a value into the YAML that sets it.
func nestedYAML(key, value string) string {
	var b strings.Builder
	parts := strings.Split(key, ".")
	for i, p := range parts {
		b.WriteString(strings.Repeat("  ", i) + p + ":")
		if i < len(parts)-1 {
			b.WriteString("\n")
		}
	}
	b.WriteString(" " + value + "\n")
	return b.String()
}

func TestNestedYAML(t *testing.T) {
	got := nestedYAML("cluster.etcd.prefix", "/otherix/")
	want := "cluster:\n  etcd:\n    prefix: /otherix/\n"
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
