package host

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestHCLogAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := newHCLogAdapter(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})).With("plugin", "gce"))
	if l.GetLevel() != hclog.Info || l.IsDebug() || !l.IsWarn() {
		t.Errorf("level = %s, IsDebug %v", l.GetLevel(), l.IsDebug())
	}
	l.Debug("hidden")
	l.Named("mayfly-plugin-gce").With("pid", 42).Warn("exited", "code", 2)
	l.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Error}).Print("std")
	out := buf.String()
	for _, want := range []string{
		`level=WARN msg=exited plugin=gce pid=42 logger=mayfly-plugin-gce code=2`,
		`level=ERROR msg=std plugin=gce`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hidden") {
		t.Errorf("debug record passed an info handler:\n%s", out)
	}
}
