package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/schedule"
)

// machineDoc is a valid docker+machine config; tests append to or edit it.
const machineDoc = `concurrent = 10
[[runners]]
  name = "r1"
  url = "https://gitlab.example.com/"
  token = "tok"
  executor = "docker+machine"
  [runners.machine]
    IdleCount = 5
    IdleTime = 600
    MaxBuilds = 1
    MachineName = "m-%s"
    MachineDriver = "qemu"
`

// autoscalerDoc is a valid taskscaler-style config.
const autoscalerDoc = `[[runners]]
  name = "r1"
  url = "http://127.0.0.1:8929"
  token = "tok"
  executor = "instance"
  [runners.autoscaler]
    plugin = "qemu"
    capacity_per_instance = 1
    max_instances = 4
    [runners.autoscaler.connector_config]
      timeout = "2m"
    [[runners.autoscaler.policy]]
      idle_count = 2
      idle_time = "20m"
`

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name     string
		doc      string
		wantLine int
		wantKey  string
		wantMsg  string
	}{
		{"syntax", "concurrent = = 1\n", 1, "", "unexpected character"},
		{"wrong type int", strings.Replace(machineDoc, "IdleCount = 5", `IdleCount = "five"`, 1), 8, "runners.machine.IdleCount", "wrong type: TOML string where an integer expected"},
		{"wrong type table", strings.Replace(machineDoc, `  [runners.machine]`, "  machine = \"x\"\n  [runners.kubernetes]", 1), 7, "runners.machine", "where a table expected"},
		{"wrong type array", strings.Replace(machineDoc, `MachineName = "m-%s"`, `MachineName = "m-%s"`+"\n    MachineOptions = \"a=b\"", 1), 12, "runners.machine.MachineOptions", "an array of strings"},
		{"unknown key with suggestion", strings.Replace(machineDoc, "IdleCount = 5", "IdelCount = 5", 1), 8, "runners.machine.IdelCount", `unknown key (did you mean "IdleCount"?)`},
		{"unknown top-level key", "concurent = 3\n" + machineDoc, 1, "concurent", `did you mean "concurrent"?`},
		{"unknown key no suggestion", machineDoc + "    Frobnicate = true\n", 13, "runners.machine.Frobnicate", "unknown key"},
		{"negative IdleCount", strings.Replace(machineDoc, "IdleCount = 5", "IdleCount = -1", 1), 8, "runners[0].machine.IdleCount", "must not be negative, got -1"},
		{"negative IdleTime", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = -5", 1), 9, "runners[0].machine.IdleTime", "must not be negative"},
		{"negative limit", strings.Replace(machineDoc, `executor =`, "limit = -2\n  executor =", 1), 6, "runners[0].limit", "must not be negative"},
		{"negative scale factor", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdleScaleFactor = -0.5", 1), 10, "runners[0].machine.IdleScaleFactor", "must not be negative"},
		{"IdleCountMin 0 with IdleScaleFactor", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdleScaleFactor = 1.5\n    IdleCountMin = 0", 1), 11, "runners[0].machine.IdleCountMin", "must be at least 1 when IdleScaleFactor is set"},
		{"IdleCountMin 0 with IdleScaleFactor in a period", machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
      IdleScaleFactor = 2.0
      IdleCountMin = 0
`, 16, "runners[0].machine.autoscaling[0].IdleCountMin", "must be at least 1"},
		{"bad timezone", machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
      Timezone = "Mars/Olympus_Mons"
`, 15, "runners[0].machine.autoscaling[0].Timezone", `unknown timezone "Mars/Olympus_Mons"`},
		{"bad period in second entry", machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
    [[runners.machine.autoscaling]]
      Periods = ["* 30-59 3 * * * *",
                 "* 0-30 25 * * * *"]
`, 17, "runners[0].machine.autoscaling[1].Periods[1]", "above maximum"},
		{"period with wrong field count", machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * *"]
`, 14, "runners[0].machine.autoscaling[0].Periods[0]", "want 5, 6 or 7 fields"},
		{"no periods", machineDoc + `    [[runners.machine.autoscaling]]
      IdleCount = 3
`, 13, "runners[0].machine.autoscaling[0].Periods", "needs at least one period"},
		{"second runner missing url", machineDoc + `[[runners]]
  name = "r2"
  token = "t2"
  executor = "instance"
  [runners.autoscaler]
    plugin = "qemu"
`, 13, "runners[1].url", "is required"},
		{"bad url", strings.Replace(machineDoc, "https://gitlab.example.com/", "ftp://x", 1), 4, "runners[0].url", "want an http:// or https:// URL"},
		{"missing token", strings.Replace(machineDoc, `  token = "tok"`+"\n", "", 1), 2, "runners[0].token", "is required"},
		{"unsupported executor", strings.Replace(machineDoc, "docker+machine", "shell", 1), 6, "runners[0].executor", `"shell" is not supported`},
		{"machine block missing", "[[runners]]\nurl = \"http://x\"\ntoken = \"t\"\nexecutor = \"docker+machine\"\n", 4, "runners[0].executor", "needs a [runners.machine] section"},
		{"missing MachineName %s", strings.Replace(machineDoc, `"m-%s"`, `"m-fixed"`, 1), 11, "runners[0].machine.MachineName", "must contain %s exactly once"},
		{"missing driver", strings.Replace(machineDoc, `    MachineDriver = "qemu"`+"\n", "", 1), 7, "runners[0].machine.MachineDriver", "is required"},
		{"capacity_per_instance", strings.Replace(autoscalerDoc, "capacity_per_instance = 1", "capacity_per_instance = 4", 1), 8, "runners[0].autoscaler.capacity_per_instance", "must be 1: mayfly runs exactly one job per VM"},
		{"policy negative idle_count", strings.Replace(autoscalerDoc, "idle_count = 2", "idle_count = -2", 1), 13, "runners[0].autoscaler.policy[0].idle_count", "must not be negative"},
		{"policy bad duration", strings.Replace(autoscalerDoc, `idle_time = "20m"`, `idle_time = "20 minutes"`, 1), 14, "runners.autoscaler.policy.idle_time", "want a duration"},
		{"policy bad timezone", strings.Replace(autoscalerDoc, "idle_count = 2", "idle_count = 2\n      timezone = \"Nowhere\"", 1), 14, "runners[0].autoscaler.policy[0].timezone", "unknown timezone"},
		{"connector bad protocol", strings.Replace(autoscalerDoc, `timeout = "2m"`, `timeout = "2m"`+"\n      protocol = \"telnet\"", 1), 12, "runners[0].autoscaler.connector_config.protocol", `"telnet" is not one of ssh, winrm`},
		{"both blocks", autoscalerDoc + "  [runners.machine]\n    MachineDriver = \"qemu\"\n", 6, "runners[0].autoscaler", "not both"},
		{"concurrent zero", strings.Replace(machineDoc, "concurrent = 10", "concurrent = 0", 1), 1, "concurrent", "must be at least 1"},
		{"bad log level", "log_level = \"loud\"\n" + machineDoc, 1, "log_level", `"loud" is not one of`},
		{"no runners", "concurrent = 1\n", 0, "runners", "no [[runners]] entry"},
		{"predictive quantile out of range", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true\n    IdlePredictiveQuantile = 1.5", 1), 11, "runners[0].machine.IdlePredictiveQuantile", "must be in (0,1), got 1.5"},
		{"predictive wrong type", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = 1", 1), 10, "runners.machine.IdlePredictive", "wrong type"},
		{"predictive within negative", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true\n    IdlePredictiveWithin = -1", 1), 11, "runners[0].machine.IdlePredictiveWithin", "must not be negative"},
		{"predictive quantile 0 in a period", machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
      IdlePredictive = true
      IdlePredictiveQuantile = 0.0
`, 16, "runners[0].machine.autoscaling[0].IdlePredictiveQuantile", "must be in (0,1), got 0"},
		{"policy predictive_quantile negative", strings.Replace(autoscalerDoc, "idle_count = 2", "idle_count = 2\n      predictive = true\n      predictive_quantile = -0.1", 1), 15, "runners[0].autoscaler.policy[0].predictive_quantile", "must be in (0,1), got -0.1"},
		{"bad environment", strings.Replace(machineDoc, `executor =`, "environment = [\"=x\"]\n  executor =", 1), 6, "runners[0].environment[0]", "want KEY=value"},
		{"negative OnDemandWithin", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    OnDemandWithin = -5", 1), 10, "runners[0].machine.OnDemandWithin", "must not be negative, got -5"},
		{"negative update_interval", strings.Replace(autoscalerDoc, "capacity_per_instance = 1", "capacity_per_instance = 1\n    update_interval = \"-2s\"", 1), 9, "runners[0].autoscaler.update_interval", "must not be negative, got -2s"},
		{"negative on_demand_within", strings.Replace(autoscalerDoc, "capacity_per_instance = 1", "capacity_per_instance = 1\n    on_demand_within = \"-1m\"", 1), 9, "runners[0].autoscaler.on_demand_within", "must not be negative, got -1m0s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("config.toml", []byte(tt.doc))
			if err == nil {
				t.Fatalf("Parse succeeded, want an error about %s", tt.wantKey)
			}
			var list ErrorList
			if !errors.As(err, &list) {
				t.Fatalf("error %v is %T, want ErrorList", err, err)
			}
			e := list[0]
			if e.File != "config.toml" || e.Line != tt.wantLine || e.Key != tt.wantKey || !strings.Contains(e.Message, tt.wantMsg) {
				t.Errorf("first error = %q\n  (file %q line %d key %q)\nwant line %d key %q message containing %q", err, e.File, e.Line, e.Key, tt.wantLine, tt.wantKey, tt.wantMsg)
			}
			if !strings.HasPrefix(err.Error(), "config.toml") {
				t.Errorf("error %q does not start with the file name", err)
			}
		})
	}
}

// TestParseReportsEveryError checks that all problems come back at once, in
// file order, so a user fixes a file in one pass.
func TestParseReportsEveryError(t *testing.T) {
	doc := strings.Replace(machineDoc, "IdleCount = 5", "IdleCount = -1", 1)
	doc = strings.Replace(doc, "concurrent = 10", "concurrent = -3", 1)
	doc = strings.Replace(doc, "IdleTime = 600", "IdleTime = -1", 1)
	_, err := Parse("c.toml", []byte(doc))
	var list ErrorList
	if !errors.As(err, &list) || len(list) != 3 {
		t.Fatalf("got %v, want 3 errors", err)
	}
	for i, want := range []int{1, 8, 9} {
		if list[i].Line != want {
			t.Errorf("error %d at line %d, want %d: %v", i, list[i].Line, want, list[i])
		}
	}
}

func TestParseWarnings(t *testing.T) {
	doc := strings.Replace(machineDoc, "MaxBuilds = 1", "MaxBuilds = 0", 1) + `    OffPeakPeriods = ["* * * * * sat,sun *"]
    [[runners.machine.autoscaling]]
      Periods = ["* 8-15 * * mon-fri"]
      IdleCount = 9
  [runners.docker]
    image = "alpine"
[session_server]
  session_timeout = 1800
`
	cfg, err := Parse("c.toml", []byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := map[string]string{
		"runners[0].machine.MaxBuilds":                 "mayfly uses each VM for one job",
		"runners.machine.OffPeakPeriods":               "removed in gitlab-runner 14.0",
		"runners[0].machine.autoscaling[0].Periods[0]": "only at second 0",
		"session_server":                               "no interactive web terminal",
	}
	got := map[string]string{}
	for _, w := range cfg.Warnings {
		got[w.Key] = w.String()
		if w.Line == 0 {
			t.Errorf("warning %v has no line", w)
		}
	}
	for key, msg := range want {
		if !strings.Contains(got[key], msg) {
			t.Errorf("warning for %s = %q, want it to contain %q", key, got[key], msg)
		}
	}
	if cfg.Runners[0].Fleet.MaxUses != 1 {
		t.Errorf("MaxUses = %d, want 1 for MaxBuilds = 0", cfg.Runners[0].Fleet.MaxUses)
	}
}

func TestHostedConfig(t *testing.T) {
	cfg, err := Load("../../testdata/hosted-gcp-linux.toml")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if len(cfg.Runners) != 1 {
		t.Fatalf("runners = %d, want 1", len(cfg.Runners))
	}
	r := cfg.Runners[0]
	f := r.Fleet
	if r.Executor != "docker+machine" || f.Provider != "gce" || f.MaxUses != 1 || f.MaxInstances != 1000 {
		t.Errorf("runner = executor %s provider %s MaxUses %d MaxInstances %d", r.Executor, f.Provider, f.MaxUses, f.MaxInstances)
	}
	if f.ProviderOptions["google-machine-type"] != "n1-standard-1" || f.ProviderOptions["google-zone"] != "us-east1-c" || f.ProviderOptions["google-preemptible"] != "true" {
		t.Errorf("provider options = %v", f.ProviderOptions)
	}
	if r.MaxJobTimeout != 3*time.Hour {
		t.Errorf("MaxJobTimeout = %v, want 3h", r.MaxJobTimeout)
	}
	tests := []struct {
		at   string
		idle int
	}{
		{"2026-11-23T12:00:00Z", 50},  // Monday
		{"2026-11-21T12:00:00Z", 70},  // Saturday
		{"2026-11-24T03:30:00Z", 700}, // the nightly spike
		{"2026-11-24T04:30:59Z", 700},
		{"2026-11-24T04:31:00Z", 50},
	}
	for _, tt := range tests {
		at, _ := time.Parse(time.RFC3339, tt.at)
		p, _ := f.Schedule.At(at)
		if p.IdleCount != tt.idle || p.IdleTime != time.Hour || p.Style != schedule.DockerMachine {
			t.Errorf("policy at %s = %+v, want IdleCount %d IdleTime 1h", tt.at, p, tt.idle)
		}
	}
}

func TestLocalConfig(t *testing.T) {
	cfg, err := Load("../../testdata/local.toml")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	f := cfg.Runners[0].Fleet
	p, _ := f.Schedule.At(time.Now())
	if f.Provider != "qemu" || f.Connector.Protocol != "ssh" || f.Connector.Timeout != 300*time.Second || p.IdleCount != 1 || p.IdleTime != 10*time.Minute || !p.PreemptiveMode {
		t.Errorf("local fleet = %+v, policy %+v", f, p)
	}
	if d := cfg.Runners[0].Docker; d == nil || f.ProviderConfig["image"] != "debian-docker" {
		t.Errorf("the local fleet runs image: jobs in Docker on debian-docker VMs: docker %+v, plugin %v", d, f.ProviderConfig)
	}
	busybox, err := Load("../../testdata/local-busybox.toml")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if f := busybox.Runners[0].Fleet; f.Provider != "qemu" || f.ProviderConfig["image"] != "busybox" {
		t.Errorf("local busybox fleet = %+v", f)
	}
}

func TestProviderAliases(t *testing.T) {
	tests := map[string]string{
		"google":    "gce",
		"amazonec2": "aws",
		"qemu":      "qemu",
		"registry.gitlab.com/gitlab-org/fleeting/plugins/googlecompute:0.1.0": "gce",
		"fleeting-plugin-aws": "aws",
		"mayfly-plugin-qemu":  "qemu",
	}
	for in, want := range tests {
		if got := provider(in); got != want {
			t.Errorf("provider(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestStoreReloadKeepsOldConfigOnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	write := func(doc string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(machineDoc)
	s, err := NewStore(path, nil)
	if err != nil {
		t.Fatalf("NewStore: %v", err)
	}
	first := s.Current()

	if changed, err := s.Reload(); changed || err != nil {
		t.Errorf("Reload of an unchanged file = %v, %v; want false, nil", changed, err)
	}

	write(strings.Replace(machineDoc, "IdleCount = 5", "IdleCount = -5", 1))
	changed, err := s.Reload()
	if changed || err == nil || !strings.Contains(err.Error(), "keeping the config in force") || !strings.Contains(err.Error(), ":8:") {
		t.Errorf("Reload of a bad file = %v, %v; want an error naming line 8", changed, err)
	}
	if s.Current() != first {
		t.Errorf("a bad reload replaced the config in force")
	}

	write(strings.Replace(machineDoc, "IdleCount = 5", "IdleCount = 8", 1))
	if changed, err := s.Reload(); !changed || err != nil {
		t.Fatalf("Reload of a fixed file = %v, %v", changed, err)
	}
	if p, _ := s.Current().Runners[0].Fleet.Schedule.At(time.Now()); p.IdleCount != 8 {
		t.Errorf("IdleCount after reload = %d, want 8", p.IdleCount)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reload(); err == nil {
		t.Errorf("Reload of a missing file succeeded")
	}
	if s.Current() == nil {
		t.Errorf("a failed reload dropped the config")
	}
}

func TestStoreWatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(machineDoc), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := NewStore(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	changes := make(chan *Config, 4)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.Watch(ctx, 10*time.Millisecond, func(c *Config) { changes <- c })
	}()
	defer func() { cancel(); wg.Wait() }()

	// A broken edit is not reported as a change; the fix is.
	if err := os.WriteFile(path, []byte("concurrent = = 1"), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if err := os.WriteFile(path, []byte(strings.Replace(machineDoc, "concurrent = 10", "concurrent = 20", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-changes:
		if c.Concurrent != 20 {
			t.Errorf("reloaded concurrent = %d, want 20", c.Concurrent)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not report the change")
	}
	select {
	case c := <-changes:
		t.Errorf("unexpected extra change: concurrent %d", c.Concurrent)
	default:
	}
}

// FuzzParse checks that no document panics the loader and that every
// rejected document says where.
func FuzzParse(f *testing.F) {
	for _, p := range []string{"../../testdata/hosted-gcp-linux.toml", "../../testdata/local.toml"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(machineDoc))
	f.Add([]byte(autoscalerDoc))
	f.Fuzz(func(t *testing.T, doc []byte) {
		cfg, err := Parse("f.toml", doc)
		if err == nil {
			if len(cfg.Runners) == 0 {
				t.Fatal("accepted a config without runners")
			}
			return
		}
		var list ErrorList
		if !errors.As(err, &list) || len(list) == 0 {
			t.Fatalf("error %v is not an ErrorList", err)
		}
		for _, e := range list {
			if e.File != "f.toml" || e.Message == "" {
				t.Fatalf("error without file or message: %#v", e)
			}
		}
	})
}

func TestOnDemandWithinKeys(t *testing.T) {
	for _, tt := range []struct {
		name string
		doc  string
		want time.Duration
	}{
		{"machine default", machineDoc, DefaultOnDemandWithin},
		{"machine seconds", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    OnDemandWithin = 30", 1), 30 * time.Second},
		{"machine off", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    OnDemandWithin = 0", 1), 0},
		{"autoscaler default", autoscalerDoc, DefaultOnDemandWithin},
		{"autoscaler duration", strings.Replace(autoscalerDoc, "capacity_per_instance = 1", "capacity_per_instance = 1\n    on_demand_within = \"2m\"", 1), 2 * time.Minute},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("c.toml", []byte(tt.doc))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := cfg.Runners[0].Fleet.OnDemandWithin; got != tt.want {
				t.Errorf("OnDemandWithin = %v, want %v", got, tt.want)
			}
			var sum strings.Builder
			if err := WriteSummary(&sum, cfg, time.Now()); err != nil {
				t.Fatal(err)
			}
			want := "only for a VM expected within " + tt.want.String()
			if tt.want == 0 {
				want = "off: a job is taken only for an idle VM"
			}
			if !strings.Contains(sum.String(), want) {
				t.Errorf("summary lacks %q:\n%s", want, sum.String())
			}
		})
	}
}

// update_interval and update_interval_when_expecting set how often the
// fleet lists the provider, so how soon a preempted VM is noticed.
func TestListIntervalKeys(t *testing.T) {
	doc := strings.Replace(autoscalerDoc, "capacity_per_instance = 1", "capacity_per_instance = 1\n    update_interval = \"5s\"\n    update_interval_when_expecting = \"500ms\"", 1)
	cfg, err := Parse("c.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	f := cfg.Runners[0].Fleet
	if f.ListInterval != 5*time.Second || f.ListIntervalBooting != 500*time.Millisecond {
		t.Errorf("list intervals %v, %v; want 5s, 500ms", f.ListInterval, f.ListIntervalBooting)
	}
	for _, w := range cfg.Warnings {
		if strings.Contains(w.Key, "update_interval") {
			t.Errorf("warned about a key mayfly uses: %s", w)
		}
	}
	var sum strings.Builder
	if err := WriteSummary(&sum, cfg, time.Now()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(sum.String(), "every 5s, every 500ms while VMs boot") || !strings.Contains(sum.String(), "also 31.25ms, 62.5ms, 125ms and 250ms after a creation") || !regexp.MustCompile(`GitLab away +artifact uploads and downloads retry 5xx, 429, 408 and connections refused or cut for 5m0s`).MatchString(sum.String()) {
		t.Errorf("summary:\n%s", sum.String())
	}
}

func TestPredictiveKeys(t *testing.T) {
	tests := []struct {
		name     string
		doc      string
		at       string // a time in the entry's period
		want     bool
		wantQ    float64
		wantWarn string // key of an expected warning
	}{
		{"off by default", machineDoc, "2026-11-23T12:00:00Z", false, 0, ""},
		{"machine default quantile", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true", 1), "2026-11-23T12:00:00Z", true, 0.95, ""},
		{"machine quantile", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true\n    IdlePredictiveQuantile = 0.99", 1), "2026-11-23T12:00:00Z", true, 0.99, ""},
		{"quantile without predictive warns", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictiveQuantile = 0.9", 1), "2026-11-23T12:00:00Z", false, 0.9, "runners[0].machine.IdlePredictiveQuantile"},
		{"autoscaling entry", machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
      IdleCount = 40
      IdlePredictive = true
      IdlePredictiveQuantile = 0.8
`, "2026-11-21T12:00:00Z", true, 0.8, ""},
		{"autoscaling entry does not inherit", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true", 1) + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
      IdleCount = 40
`, "2026-11-21T12:00:00Z", false, 0, ""},
		{"autoscaler policy", strings.Replace(autoscalerDoc, "idle_count = 2", "idle_count = 2\n      predictive = true\n      predictive_quantile = 0.9", 1), "2026-11-23T12:00:00Z", true, 0.9, ""},
		{"autoscaler policy default quantile", strings.Replace(autoscalerDoc, "idle_count = 2", "idle_count = 2\n      predictive = true", 1), "2026-11-23T12:00:00Z", true, 0.95, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("c.toml", []byte(tt.doc))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			at, _ := time.Parse(time.RFC3339, tt.at)
			p, _ := cfg.Runners[0].Fleet.Schedule.At(at)
			if p.Predictive != tt.want || p.PredictiveQuantile != tt.wantQ {
				t.Errorf("policy = Predictive %v quantile %v, want %v %v", p.Predictive, p.PredictiveQuantile, tt.want, tt.wantQ)
			}
			warned := false
			for _, w := range cfg.Warnings {
				warned = warned || (tt.wantWarn != "" && w.Key == tt.wantWarn)
			}
			if tt.wantWarn != "" && !warned {
				t.Errorf("no warning for %s in %v", tt.wantWarn, cfg.Warnings)
			}
			var sum strings.Builder
			if err := WriteSummary(&sum, cfg, at); err != nil {
				t.Fatal(err)
			}
			var nowLine string
			for line := range strings.Lines(sum.String()) {
				if strings.HasPrefix(line, "  now ") {
					nowLine = line
				}
			}
			if got := strings.Contains(nowLine, fmt.Sprintf("predictive, quantile %g", tt.wantQ)); got != tt.want {
				t.Errorf("summary line %q mentions predictive = %v, want %v", nowLine, got, tt.want)
			}
		})
	}
}

// TestStoreWatchAppliesOnlyStableFiles: a file caught half-written is not
// applied even when it parses, rejected reloads are logged, and a reload
// that drops a runner's idle policy entries warns (issue 20).
func TestStoreWatchAppliesOnlyStableFiles(t *testing.T) {
	withPeriods := machineDoc + `    [[runners.machine.autoscaling]]
      Periods = ["* * * * * sat,sun *"]
      IdleCount = 70
`
	path := filepath.Join(t.TempDir(), "config.toml")
	write := func(doc string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(withPeriods)
	var logs syncBuffer
	s, err := NewStore(path, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	changes := make(chan *Config, 8)
	w := &watcher{s: s, onChange: func(c *Config) { changes <- c }}
	tick := w.tick // Watch's work at one tick, done when it returns
	noChange := func(when string) {
		t.Helper()
		tick()
		select {
		case c := <-changes:
			t.Fatalf("%s: a config was applied (concurrent %d, %d entries)", when, c.Concurrent, len(c.Runners[0].Fleet.Schedule.Entries))
		default:
		}
	}

	// Half written: what is there parses but has lost the periods.
	write(strings.Replace(machineDoc, "concurrent = 10", "concurrent = 20", 1))
	noChange("half-written file")
	write(strings.Replace(withPeriods, "concurrent = 10", "concurrent = 20", 1))
	noChange("just finished file")
	tick()
	tick()
	select {
	case c := <-changes:
		if c.Concurrent != 20 || len(c.Runners[0].Fleet.Schedule.Entries) != 1 {
			t.Errorf("applied concurrent %d with %d entries, want the whole file (20, 1)", c.Concurrent, len(c.Runners[0].Fleet.Schedule.Entries))
		}
	default:
		t.Fatal("the finished file was not applied")
	}

	// A rejected reload is logged, with the file and line.
	write(strings.Replace(withPeriods, "IdleCount = 5", "IdleCount = -5", 1))
	noChange("broken file")
	noChange("broken file, still")
	noChange("broken file, logged")
	if !strings.Contains(logs.String(), "config reload rejected") || !strings.Contains(logs.String(), path+":8:") {
		t.Errorf("rejected reload not logged with file and line:\n%s", logs.String())
	}

	// Dropping every policy entry is applied, with a warning.
	write(machineDoc)
	tick()
	tick()
	tick()
	select {
	case c := <-changes:
		if len(c.Runners[0].Fleet.Schedule.Entries) != 0 {
			t.Errorf("entries = %d", len(c.Runners[0].Fleet.Schedule.Entries))
		}
	default:
		t.Fatal("the file without periods was not applied")
	}
	if !strings.Contains(logs.String(), `had 1 idle policy entries and has none now`) {
		t.Errorf("no warning for the lost policy entries:\n%s", logs.String())
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The get_sources hooks under their current and old names; both names at
// once is an error naming the new key.
func TestGetSourcesScriptKeys(t *testing.T) {
	at := func(key string) string {
		return strings.Replace(machineDoc, "executor =", key+"\n  executor =", 1)
	}
	for _, tt := range []struct {
		name, doc, pre, post, errKey string
	}{
		{"new names", at("pre_get_sources_script = \"echo pre\"\n  post_get_sources_script = \"echo post\""), "echo pre", "echo post", ""},
		{"old names", at("pre_clone_script = \"echo pre\"\n  post_clone_script = \"echo post\""), "echo pre", "echo post", ""},
		{"both pre", at("pre_clone_script = \"a\"\n  pre_get_sources_script = \"b\""), "", "", "runners[0].pre_get_sources_script"},
		{"both post", at("post_clone_script = \"a\"\n  post_get_sources_script = \"b\""), "", "", "runners[0].post_get_sources_script"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("c.toml", []byte(tt.doc))
			if tt.errKey != "" {
				var list ErrorList
				if !errors.As(err, &list) || list[0].Key != tt.errKey || !strings.Contains(list[0].Message, "not both") {
					t.Fatalf("err %v, want one about %s", err, tt.errKey)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if r := cfg.Runners[0]; r.PreCloneScript != tt.pre || r.PostCloneScript != tt.post {
				t.Errorf("pre %q post %q", r.PreCloneScript, r.PostCloneScript)
			}
		})
	}
}

func TestPredictiveWithinKeys(t *testing.T) {
	for _, tt := range []struct {
		name     string
		doc      string
		want     time.Duration
		wantWarn string
	}{
		{"unset: at once", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true", 1), 0, ""},
		{"machine seconds", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictive = true\n    IdlePredictiveWithin = 120", 1), 2 * time.Minute, ""},
		{"without predictive warns", strings.Replace(machineDoc, "IdleTime = 600", "IdleTime = 600\n    IdlePredictiveWithin = 120", 1), 2 * time.Minute, "runners[0].machine.IdlePredictiveWithin"},
		{"autoscaler duration", strings.Replace(autoscalerDoc, "idle_count = 2", "idle_count = 2\n      predictive = true\n      predictive_within = \"2m\"", 1), 2 * time.Minute, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("c.toml", []byte(tt.doc))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			at, _ := time.Parse(time.RFC3339, "2026-11-23T12:00:00Z")
			if p, _ := cfg.Runners[0].Fleet.Schedule.At(at); p.PredictiveWithin != tt.want {
				t.Errorf("PredictiveWithin = %v, want %v", p.PredictiveWithin, tt.want)
			}
			warned := false
			for _, w := range cfg.Warnings {
				warned = warned || w.Key == tt.wantWarn
			}
			if tt.wantWarn != "" && !warned {
				t.Errorf("no warning for %s in %v", tt.wantWarn, cfg.Warnings)
			}
		})
	}
}
