package sdk

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestLogHandlerFormat checks the fields the go-plugin host parses: an
// hclog level name, the message, and a timestamp in hclog's layout.
func TestLogHandlerFormat(t *testing.T) {
	tests := []struct {
		level slog.Level
		want  string
	}{
		{slog.LevelDebug - 4, "trace"},
		{slog.LevelDebug, "debug"},
		{slog.LevelInfo, "info"},
		{slog.LevelWarn, "warn"},
		{slog.LevelError, "error"},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		l := slog.New(NewLogHandler(&buf, slog.LevelDebug-4))
		l.Log(t.Context(), tt.level, "created", "id", "i-1", slog.Group("g", "k", 1))
		var line map[string]any
		if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
			t.Fatalf("not JSON: %q", buf.String())
		}
		if line["@level"] != tt.want || line["@message"] != "created" || line["id"] != "i-1" {
			t.Errorf("level %s: line %v", tt.level, line)
		}
		ts, _ := line["@timestamp"].(string)
		if _, err := time.Parse("2006-01-02T15:04:05.000000Z07:00", ts); err != nil {
			t.Errorf("timestamp %q not in hclog layout: %v", ts, err)
		}
		if g, _ := line["g"].(map[string]any); g["k"] != float64(1) {
			t.Errorf("group lost: %v", line["g"])
		}
	}
}

// TestLogHandlerRedacts: a plugin's log records reach the host with their
// secrets redacted, whatever the plugin logs.
func TestLogHandlerRedacts(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(NewLogHandler(&buf, slog.LevelDebug))
	l.Info("settings", "region", "us-east-1", "secret_access_key", "SECRET-1", slog.Group("winrm", "password", "SECRET-2"))
	if strings.Contains(buf.String(), "SECRET-") || !strings.Contains(buf.String(), "us-east-1") || !strings.Contains(buf.String(), `"@level":"info"`) {
		t.Errorf("plugin log line %s", buf.String())
	}
}
