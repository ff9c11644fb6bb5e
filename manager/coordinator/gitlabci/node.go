package gitlabci

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"gopkg.in/yaml.v3"
)

// Limits on what the loader accepts, as GitLab bounds them.
const (
	// MaxFileBytes is the largest configuration file read (GitLab's max_yaml_size_bytes is 2 MB).
	MaxFileBytes = 2 << 20
	// MaxDepth is the deepest nesting accepted (GitLab's max_yaml_depth).
	MaxDepth = 100
	// maxNodes bounds the nodes built after aliases are expanded, so an
	// alias bomb costs an error, not the memory of the machine.
	maxNodes = 250_000
)

type nodeKind int

const (
	kindNull nodeKind = iota
	kindScalar
	kindSeq
	kindMap
)

func (k nodeKind) String() string {
	return [...]string{"null", "a scalar", "a list", "a hash"}[k]
}

// node is a YAML value with aliases and merge keys resolved and its
// position kept for messages.
type node struct {
	kind  nodeKind
	tag   string // "!!str", "!!int", "!!bool", "!!float", "!reference", …
	value string // scalars
	file  string
	line  int
	items []*node // lists
	keys  []*node // hashes: scalar key nodes, in order
	vals  []*node
	idx   map[string]int // key → position, built for large hashes
}

// lookup returns the position of key k in a hash, or -1. Large hashes get
// an index so that reading a file with many jobs stays linear.
func (n *node) lookup(k string) int {
	if n == nil || n.kind != kindMap {
		return -1
	}
	if n.idx == nil && len(n.keys) > 16 {
		n.idx = make(map[string]int, len(n.keys))
		for i, key := range n.keys {
			n.idx[key.value] = i
		}
	}
	if n.idx != nil {
		if i, ok := n.idx[k]; ok {
			return i
		}
		return -1
	}
	for i, key := range n.keys {
		if key.value == k {
			return i
		}
	}
	return -1
}

// add appends key k (not yet in the hash) with value v.
func (n *node) add(k, v *node) {
	n.keys = append(n.keys, k)
	n.vals = append(n.vals, v)
	if n.idx != nil {
		n.idx[k.value] = len(n.keys) - 1
	}
}

// get returns the value of key k of a hash, or nil.
func (n *node) get(k string) *node {
	if i := n.lookup(k); i >= 0 {
		return n.vals[i]
	}
	return nil
}

// has reports whether a hash has key k (even with a null value).
func (n *node) has(k string) bool { return n.lookup(k) >= 0 }

// set replaces or appends key k.
func (n *node) set(k string, v *node) {
	if i := n.lookup(k); i >= 0 {
		n.vals[i] = v
		return
	}
	n.add(&node{kind: kindScalar, tag: "!!str", value: k, file: v.file, line: v.line}, v)
}

// without returns a shallow copy of a hash without the given keys.
func (n *node) without(ks ...string) *node {
	out := &node{kind: kindMap, tag: n.tag, file: n.file, line: n.line}
	for i, key := range n.keys {
		skip := false
		for _, k := range ks {
			if key.value == k {
				skip = true
			}
		}
		if !skip {
			out.add(key, n.vals[i])
		}
	}
	return out
}

// text is a scalar as text ("" for null).
func (n *node) text() string {
	if n == nil || n.kind != kindScalar {
		return ""
	}
	return n.value
}

// loader turns yaml.v3 nodes into nodes, expanding aliases and merge keys.
type loader struct {
	file  string
	nodes int
	warn  func(line int, msg string)
}

// load parses one YAML document. An empty document gives a null node.
func load(file string, data []byte, warn func(line int, msg string)) (*node, error) {
	if len(data) > MaxFileBytes {
		return nil, &Error{File: file, Msg: fmt.Sprintf("file is %d bytes, more than the %d accepted", len(data), MaxFileBytes)}
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := safeDecode(dec, &doc); err != nil {
		if errors.Is(err, io.EOF) {
			return &node{kind: kindNull, file: file, line: 1}, nil
		}
		line, msg := yamlErrLine(err)
		return nil, &Error{File: file, Line: line, Msg: "invalid YAML: " + msg}
	}
	var more yaml.Node
	if err := safeDecode(dec, &more); err == nil {
		return nil, &Error{File: file, Line: more.Line, Msg: "more than one YAML document; GitLab reads one"}
	}
	l := &loader{file: file, warn: warn}
	return l.build(&doc, 0)
}

// safeDecode decodes one document, turning a panic of the YAML library on
// hostile input into an error.
func safeDecode(dec *yaml.Decoder, v *yaml.Node) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("yaml: %v", r)
		}
	}()
	return dec.Decode(v)
}

// yamlErrLine splits a yaml.v3 syntax error ("yaml: line 3: …") into its
// line number and message.
func yamlErrLine(err error) (int, string) {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	var line int
	if _, scanErr := fmt.Sscanf(msg, "line %d:", &line); scanErr == nil {
		_, rest, _ := strings.Cut(msg, ": ")
		return line, rest
	}
	return 0, msg
}

func (l *loader) errorf(line int, format string, a ...any) error {
	return &Error{File: l.file, Line: line, Msg: fmt.Sprintf(format, a...)}
}

func (l *loader) build(y *yaml.Node, depth int) (*node, error) {
	if depth > MaxDepth {
		return nil, l.errorf(y.Line, "nesting deeper than %d levels", MaxDepth)
	}
	if l.nodes++; l.nodes > maxNodes {
		return nil, l.errorf(y.Line, "more than %d values after expanding aliases", maxNodes)
	}
	switch y.Kind {
	case yaml.DocumentNode:
		if len(y.Content) == 0 {
			return &node{kind: kindNull, file: l.file, line: y.Line}, nil
		}
		return l.build(y.Content[0], depth+1)
	case yaml.AliasNode:
		if y.Alias == nil {
			return nil, l.errorf(y.Line, "alias *%s names no anchor", y.Value)
		}
		return l.build(y.Alias, depth+1)
	case yaml.ScalarNode:
		tag := y.ShortTag()
		if tag == "!!null" {
			return &node{kind: kindNull, tag: tag, file: l.file, line: y.Line}, nil
		}
		return &node{kind: kindScalar, tag: tag, value: y.Value, file: l.file, line: y.Line}, nil
	case yaml.SequenceNode:
		n := &node{kind: kindSeq, tag: y.ShortTag(), file: l.file, line: y.Line}
		for _, c := range y.Content {
			v, err := l.build(c, depth+1)
			if err != nil {
				return nil, err
			}
			n.items = append(n.items, v)
		}
		return n, nil
	case yaml.MappingNode:
		return l.buildMap(y, depth)
	}
	return nil, l.errorf(y.Line, "unexpected YAML node")
}

// buildMap builds a hash. Merge keys (<<) add the keys of the merged hashes
// that the hash does not set itself; a key written twice keeps its last value.
func (l *loader) buildMap(y *yaml.Node, depth int) (*node, error) {
	n := &node{kind: kindMap, tag: y.ShortTag(), file: l.file, line: y.Line}
	var merged []*node
	for i := 0; i+1 < len(y.Content); i += 2 {
		ky, vy := y.Content[i], y.Content[i+1]
		if ky.Kind == yaml.ScalarNode && ky.ShortTag() == "!!merge" {
			srcs := []*yaml.Node{vy}
			if vy.Kind == yaml.SequenceNode {
				srcs = vy.Content
			}
			for _, src := range srcs {
				m, err := l.build(src, depth+1)
				if err != nil {
					return nil, err
				}
				if m.kind != kindMap {
					return nil, l.errorf(src.Line, "<< must merge a hash, not %s", m.kind)
				}
				merged = append(merged, m)
			}
			continue
		}
		if ky.Kind != yaml.ScalarNode {
			return nil, l.errorf(ky.Line, "hash keys must be plain text")
		}
		v, err := l.build(vy, depth+1)
		if err != nil {
			return nil, err
		}
		if n.has(ky.Value) {
			if l.warn != nil {
				l.warn(ky.Line, fmt.Sprintf("key %q is written twice; the last one counts", ky.Value))
			}
			n.set(ky.Value, v)
			continue
		}
		n.add(&node{kind: kindScalar, tag: "!!str", value: ky.Value, file: l.file, line: ky.Line}, v)
	}
	// Earlier merge sources win over later ones; the hash's own keys over all.
	for _, m := range merged {
		for i, k := range m.keys {
			if !n.has(k.value) {
				n.add(k, m.vals[i])
			}
		}
	}
	return n, nil
}

// deepMerge returns base with over merged on top, as extends: and include:
// do: hashes merge key by key, anything else is replaced.
func deepMerge(base, over *node) *node {
	if base == nil || base.kind != kindMap || over == nil || over.kind != kindMap {
		return over
	}
	out := &node{kind: kindMap, tag: over.tag, file: over.file, line: over.line}
	for i, k := range base.keys {
		out.add(k, base.vals[i])
	}
	for i, k := range over.keys {
		v := over.vals[i]
		if old := out.get(k.value); old != nil {
			v = deepMerge(old, v)
		}
		out.setKey(k, v)
	}
	return out
}

// setKey is set keeping the key node (and so its line) of the newer value.
func (n *node) setKey(k, v *node) {
	if i := n.lookup(k.value); i >= 0 {
		n.keys[i], n.vals[i] = k, v
		return
	}
	n.add(k, v)
}
