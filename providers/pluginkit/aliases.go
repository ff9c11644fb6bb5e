package pluginkit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"

	"github.com/mayfly-ci/mayfly/providers"
)

// Alias is a deprecated settings key and the key that replaced it.
type Alias struct {
	// Old is the deprecated top-level key.
	Old string
	// New is the key that replaced it; "a.b" is key b of the object a
	// (made when absent).
	New string
	// Match, if set, limits the alias to values it accepts, e.g. a number
	// where the new form of the same key is an object.
	Match func(value json.RawMessage) bool
	// Convert, if set, turns the old value into the new one (e.g. a
	// negated boolean); by default the value moves unchanged.
	Convert func(value json.RawMessage) (json.RawMessage, error)
}

// DecodeSettings is providers.DecodeSettings after RenameKeys: it decodes
// settings into v, reading the deprecated keys of aliases under their new
// names. An error about a key given by its deprecated name names both.
func DecodeSettings(settings json.RawMessage, v any, log *slog.Logger, aliases ...Alias) error {
	renamed, used, err := renameKeys(settings, log, aliases)
	if err != nil {
		return err
	}
	err = providers.DecodeSettings(renamed, v)
	if err == nil {
		return nil
	}
	for _, a := range used {
		if strings.Contains(err.Error(), `"`+a.New+`"`) || strings.Contains(err.Error(), `"`+a.New+`.`) {
			return providers.InvalidArgument(fmt.Errorf("%w (given by its deprecated name %q)", err, a.Old))
		}
	}
	return err
}

// RenameKeys returns settings with each deprecated key replaced by its new
// name, in the order of aliases, logging one warning per deprecated key
// found. Settings that give both a deprecated key and its replacement are
// an invalid_argument error naming both. Settings that are not a JSON
// object are returned as they are, for providers.DecodeSettings to report.
func RenameKeys(settings json.RawMessage, log *slog.Logger, aliases ...Alias) (json.RawMessage, error) {
	out, _, err := renameKeys(settings, log, aliases)
	return out, err
}

func renameKeys(settings json.RawMessage, log *slog.Logger, aliases []Alias) (json.RawMessage, []Alias, error) {
	trimmed := bytes.TrimSpace(settings)
	var obj map[string]json.RawMessage
	if len(trimmed) == 0 || trimmed[0] != '{' || json.Unmarshal(trimmed, &obj) != nil {
		return settings, nil, nil
	}
	var used []Alias
	for _, a := range aliases {
		v, ok := obj[a.Old]
		if !ok || (a.Match != nil && !a.Match(v)) {
			continue
		}
		if a.Convert != nil {
			var err error
			if v, err = a.Convert(v); err != nil {
				return nil, nil, providers.InvalidArgument(fmt.Errorf("settings key %q (deprecated, now %q): %w", a.Old, a.New, err))
			}
		}
		delete(obj, a.Old)
		if err := setPath(obj, a.New, v); err != nil {
			return nil, nil, providers.InvalidArgument(fmt.Errorf("settings key %q: %w", a.Old, err))
		}
		used = append(used, a)
		if log != nil {
			log.Warn("deprecated settings key; use the new name", "key", a.Old, "new_key", a.New)
		}
	}
	if len(used) == 0 {
		return settings, nil, nil
	}
	out, err := json.Marshal(obj)
	if err != nil {
		return nil, nil, providers.InvalidArgument(fmt.Errorf("settings: %w", err))
	}
	return out, used, nil
}

// setPath sets key path ("a" or "a.b") of obj to v, refusing to overwrite
// a key the settings give themselves.
func setPath(obj map[string]json.RawMessage, path string, v json.RawMessage) error {
	parent, child, nested := strings.Cut(path, ".")
	if !nested {
		if _, ok := obj[path]; ok {
			return fmt.Errorf("deprecated name of %q, which is also set; keep only %q", path, path)
		}
		obj[path] = v
		return nil
	}
	inner := map[string]json.RawMessage{}
	if raw, ok := obj[parent]; ok {
		if err := json.Unmarshal(raw, &inner); err != nil {
			return fmt.Errorf("deprecated name of %q, but %q is not an object: %w", path, parent, err)
		}
	}
	if _, ok := inner[child]; ok {
		return fmt.Errorf("deprecated name of %q, which is also set; keep only %q", path, path)
	}
	inner[child] = v
	b, err := json.Marshal(inner)
	if err != nil {
		return err
	}
	obj[parent] = b
	return nil
}

// IsNumber is an Alias.Match for values that are JSON numbers.
func IsNumber(v json.RawMessage) bool {
	var f float64
	return json.Unmarshal(v, &f) == nil
}

// Negate is an Alias.Convert for a boolean key replaced by its opposite
// (no_external_ip → external_ip).
func Negate(v json.RawMessage) (json.RawMessage, error) {
	var b bool
	if err := json.Unmarshal(v, &b); err != nil {
		return nil, fmt.Errorf("want true or false: %w", err)
	}
	return json.Marshal(!b)
}
