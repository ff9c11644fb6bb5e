package providers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"
)

// DecodeSettings decodes plugin settings (a JSON object) into v, rejecting
// unknown keys. Empty or null settings leave v unchanged. Errors name the
// offending key and are of KindInvalidArgument.
func DecodeSettings(settings json.RawMessage, v any) error {
	trimmed := bytes.TrimSpace(settings)
	if len(trimmed) == 0 || bytes.Equal(trimmed, []byte("null")) {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var typeErr *json.UnmarshalTypeError
		var syntaxErr *json.SyntaxError
		switch {
		case errors.As(err, &typeErr) && typeErr.Field != "":
			err = fmt.Errorf("settings key %q: cannot use JSON %s as %s", typeErr.Field, typeErr.Value, typeErr.Type)
		case errors.As(err, &syntaxErr):
			err = fmt.Errorf("settings: malformed JSON at byte %d: %w", syntaxErr.Offset, err)
		case errors.Is(err, io.ErrUnexpectedEOF):
			err = errors.New("settings: malformed JSON: unexpected end of input")
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			err = fmt.Errorf("settings: unknown key %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
		default:
			if key := failingKey(trimmed, v); key != "" {
				err = fmt.Errorf("settings key %q: %w", key, err)
			} else {
				err = fmt.Errorf("settings: %w", err)
			}
		}
		return InvalidArgument(err)
	}
	if dec.More() {
		return InvalidArgument(errors.New("settings: trailing data after the JSON object"))
	}
	return nil
}

// failingKey finds the top-level key of object whose value alone fails to
// decode into a fresh value of v's type, to name it in an error.
func failingKey(object []byte, v any) string {
	var fields map[string]json.RawMessage
	if json.Unmarshal(object, &fields) != nil {
		return ""
	}
	t := reflect.TypeOf(v)
	if t == nil || t.Kind() != reflect.Pointer {
		return ""
	}
	keys := slices.Sorted(maps.Keys(fields))
	for _, k := range keys {
		one, err := json.Marshal(map[string]json.RawMessage{k: fields[k]})
		if err != nil {
			continue
		}
		if json.Unmarshal(one, reflect.New(t.Elem()).Interface()) != nil {
			return k
		}
	}
	return ""
}

// Duration is a time.Duration that reads and writes JSON as a Go duration
// string ("1m30s"), for plugin settings.
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON implements json.Unmarshaler. It accepts a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	if v < 0 {
		return fmt.Errorf("duration %q is negative", s)
	}
	*d = Duration(v)
	return nil
}
