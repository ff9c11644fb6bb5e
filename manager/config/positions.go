package config

import (
	"fmt"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// position is a place in a config file.
type position struct{ line, column int }

// positions maps resolved key paths such as "runners[0].machine.IdleCount"
// or "runners[0].machine.autoscaling[1].Periods[2]" to where they are written,
// so that errors found after decoding can still name a line.
type positions map[string]position

// indexPositions parses doc and records the position of every table header,
// key and array element. A document that does not parse yields what was
// indexed so far; the decoder reports the syntax error itself.
func indexPositions(doc []byte) positions {
	pos := positions{}
	arrays := map[string]int{} // array-of-tables path -> elements seen
	var p unstable.Parser
	p.Reset(doc)
	var table string // resolved path of the current table
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			parts := keyParts(e.Key())
			path := resolve(arrays, "", parts[:len(parts)-1])
			path = join(path, parts[len(parts)-1])
			if e.Kind == unstable.ArrayTable {
				arrays[path]++
				path = fmt.Sprintf("%s[%d]", path, arrays[path]-1)
			}
			table = path
			pos.add(&p, path, firstKey(e))
		case unstable.KeyValue:
			parts := keyParts(e.Key())
			path := join(table, strings.Join(parts, "."))
			pos.add(&p, path, firstKey(e))
			pos.value(&p, path, e.Value())
		}
	}
	return pos
}

// value records the positions inside an array or inline-table value.
func (pos positions) value(p *unstable.Parser, path string, v *unstable.Node) {
	switch v.Kind {
	case unstable.Array:
		it := v.Children()
		for i := 0; it.Next(); i++ {
			el := fmt.Sprintf("%s[%d]", path, i)
			pos.add(p, el, it.Node())
			pos.value(p, el, it.Node())
		}
	case unstable.InlineTable:
		it := v.Children()
		for it.Next() {
			kv := it.Node()
			sub := join(path, strings.Join(keyParts(kv.Key()), "."))
			pos.add(p, sub, firstKey(kv))
			pos.value(p, sub, kv.Value())
		}
	}
}

func (pos positions) add(p *unstable.Parser, path string, n *unstable.Node) {
	if n == nil || n.Raw.Length == 0 {
		return
	}
	if _, seen := pos[path]; seen {
		return
	}
	s := p.Shape(n.Raw)
	pos[path] = position{s.Start.Line, s.Start.Column}
}

// lookup returns the position of path, or of its nearest written ancestor.
func (pos positions) lookup(path string) (position, bool) {
	for path != "" {
		if at, ok := pos[path]; ok {
			return at, true
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return position{}, false
}

func keyParts(it unstable.Iterator) []string {
	var parts []string
	for it.Next() {
		parts = append(parts, string(it.Node().Data))
	}
	return parts
}

func firstKey(kv *unstable.Node) *unstable.Node {
	it := kv.Key()
	if it.Next() {
		return it.Node()
	}
	return nil
}

// resolve turns a table header's leading parts into a path, indexing each
// part that names an array of tables by its latest element.
func resolve(arrays map[string]int, path string, parts []string) string {
	for _, part := range parts {
		path = join(path, part)
		if n := arrays[path]; n > 0 {
			path = fmt.Sprintf("%s[%d]", path, n-1)
		}
	}
	return path
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}
