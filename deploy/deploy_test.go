package deploy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/mayfly-ci/mayfly/manager/config"
)

// hostedJobCap is the hard cap on a job on hosted runners; every drain
// timeout must cover it.
const hostedJobCap = 3 * time.Hour

// requireTool returns the path of name, or skips the test when it is
// missing; with CI=true it fails instead. make setup installs every tool
// these tests use (promtool from Debian's prometheus package,
// systemd-analyze from systemd).
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found in PATH and CI=true: make setup installs it", name)
	}
	t.Skipf("%s not found in PATH: skipping (make setup installs it; with CI=true this fails)", name)
	return ""
}

// run runs a command in dir with a timeout and returns its combined output.
func run(t *testing.T, dir string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestPromtool(t *testing.T) {
	promtool := requireTool(t, "promtool")
	out, err := run(t, "prometheus", promtool, "check", "rules", "rules.yml")
	if err != nil || !strings.Contains(out, "SUCCESS") {
		t.Fatalf("promtool check rules rules.yml: %v\n%s", err, out)
	}
	out, err = run(t, "prometheus", promtool, "test", "rules", "rules_test.yml")
	if err != nil || !strings.Contains(out, "SUCCESS") {
		t.Fatalf("promtool test rules rules_test.yml: %v\n%s", err, out)
	}
}

// knownMetrics returns the series names mayfly exports, read from the
// metric definitions in the manager and fleet packages (histograms with
// their _bucket, _count and _sum series).
func knownMetrics(t *testing.T) map[string]bool {
	t.Helper()
	known := map[string]bool{}
	for _, path := range []string{"../manager/metrics.go", "../fleet/metrics.go"} {
		fset := token.NewFileSet()
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatalf("parse %s: %v", path, err)
		}
		n := 0
		ast.Inspect(f, func(node ast.Node) bool {
			lit, ok := node.(*ast.CompositeLit)
			if !ok {
				return true
			}
			sel, ok := lit.Type.(*ast.SelectorExpr)
			if !ok || !strings.HasSuffix(sel.Sel.Name, "Opts") {
				return true
			}
			for _, el := range lit.Elts {
				kv, ok := el.(*ast.KeyValueExpr)
				if !ok {
					continue
				}
				if id, ok := kv.Key.(*ast.Ident); !ok || id.Name != "Name" {
					continue
				}
				bl, ok := kv.Value.(*ast.BasicLit)
				if !ok || bl.Kind != token.STRING {
					t.Fatalf("%s: metric Name is not a string literal at %s", path, fset.Position(kv.Pos()))
				}
				name, _ := strconv.Unquote(bl.Value)
				n++
				if sel.Sel.Name == "HistogramOpts" {
					for _, s := range []string{"_bucket", "_count", "_sum"} {
						known[name+s] = true
					}
					continue
				}
				known[name] = true
			}
			return true
		})
		if n == 0 {
			t.Fatalf("%s: no metric definitions found", path)
		}
	}
	return known
}

// rulesFile is the part of a Prometheus rules file the tests read.
type rulesFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Record      string            `yaml:"record"`
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func loadRules(t *testing.T) rulesFile {
	t.Helper()
	var rf rulesFile
	decodeYAMLFile(t, "prometheus/rules.yml", &rf)
	if len(rf.Groups) == 0 {
		t.Fatal("prometheus/rules.yml: no groups")
	}
	return rf
}

func decodeYAMLFile(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// knownSeries is knownMetrics plus the recording rules' names.
func knownSeries(t *testing.T) map[string]bool {
	known := knownMetrics(t)
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				known[r.Record] = true
			}
		}
	}
	return known
}

// promqlFuncs are the PromQL functions and aggregations the rules and the
// dashboard may call.
var promqlFuncs = map[string]bool{
	"sum": true, "avg": true, "min": true, "max": true, "count": true, "topk": true, "bottomk": true,
	"quantile": true, "rate": true, "irate": true, "increase": true, "delta": true,
	"histogram_quantile": true, "clamp_min": true, "clamp_max": true, "abs": true,
	"min_over_time": true, "max_over_time": true, "avg_over_time": true, "label_values": true,
	"absent": true, "vector": true, "scalar": true, "time": true,
}

var promqlKeywords = map[string]bool{
	"and": true, "or": true, "unless": true, "bool": true, "offset": true, "by": true,
	"without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"inf": true, "nan": true, "Inf": true, "NaN": true,
}

var (
	reGrafanaVar = regexp.MustCompile(`\$\{?\w+\}?`)
	reString     = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	reMatchers   = regexp.MustCompile(`\{[^{}]*\}`)
	reRange      = regexp.MustCompile(`\[[^\[\]]*\]`)
	reGrouping   = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)`)
	reIdent      = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*`)
)

// metricNames returns the series names a PromQL expression (possibly with
// Grafana variables) selects. It fails on calls to unknown functions, which
// is how a typo in a function name or a metric used as a call shows up.
func metricNames(expr string) ([]string, error) {
	s := reGrafanaVar.ReplaceAllString(expr, "x")
	s = reString.ReplaceAllString(s, `""`)
	s = reMatchers.ReplaceAllString(s, "")
	s = reRange.ReplaceAllString(s, "")
	s = reGrouping.ReplaceAllString(s, "")
	var names []string
	for _, loc := range reIdent.FindAllStringIndex(s, -1) {
		if loc[0] > 0 {
			if c := s[loc[0]-1]; c == '.' || (c >= '0' && c <= '9') {
				continue // the exponent or unit of a number: 1e3, 5m
			}
		}
		id := s[loc[0]:loc[1]]
		rest := strings.TrimLeft(s[loc[1]:], " \t\n")
		switch {
		case strings.HasPrefix(rest, "("):
			if !promqlFuncs[id] {
				return nil, fmt.Errorf("unknown function %q in %q", id, expr)
			}
		case promqlKeywords[id]:
		default:
			names = append(names, id)
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("no metric in %q", expr)
	}
	return names, nil
}

func TestMetricNames(t *testing.T) {
	tests := []struct {
		expr    string
		want    []string
		wantErr bool
	}{
		{`up`, []string{"up"}, false},
		{`sum by (runner, le) (rate(a_bucket{le=~"120|120\\.0", x="a{b}"}[5m] offset 1h))`, []string{"a_bucket"}, false},
		{`a / on (runner) group_left (state) b > 0.5e3 and c`, []string{"a", "b", "c"}, false},
		{`runner:x:ratio{runner=~"$runner"} < bool 0.9`, []string{"runner:x:ratio"}, false},
		{`histogram_quantile(0.9, sum by (le) (rate(h_bucket[$__rate_interval])))`, []string{"h_bucket"}, false},
		{`rat(x[5m])`, nil, true},
		{`sum(rate(x[5m])) by (op)`, []string{"x"}, false},
		{`1 + 2`, nil, true},
	}
	for _, tt := range tests {
		got, err := metricNames(tt.expr)
		if (err != nil) != tt.wantErr {
			t.Errorf("metricNames(%q) error = %v, want error %v", tt.expr, err, tt.wantErr)
			continue
		}
		if !tt.wantErr && !slices.Equal(got, tt.want) {
			t.Errorf("metricNames(%q) = %q, want %q", tt.expr, got, tt.want)
		}
	}
}

func TestRules(t *testing.T) {
	known := knownSeries(t)
	rf := loadRules(t)
	alerts := map[string]bool{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			name := r.Record + r.Alert
			names, err := metricNames(r.Expr)
			if err != nil {
				t.Errorf("rule %s: %v", name, err)
			}
			for _, m := range names {
				if !known[m] {
					t.Errorf("rule %s: series %q is neither a mayfly metric (manager/metrics.go, fleet/metrics.go) nor a recording rule", name, m)
				}
			}
			if r.Alert == "" {
				continue
			}
			alerts[r.Alert] = true
			if s := r.Labels["severity"]; s != "page" && s != "warning" {
				t.Errorf("alert %s: severity label %q, want page or warning", r.Alert, s)
			}
			for _, a := range []string{"summary", "description"} {
				if r.Annotations[a] == "" {
					t.Errorf("alert %s: no %s annotation", r.Alert, a)
				}
			}
		}
	}
	for _, a := range []string{"MayflyJobStartSLOBreached", "MayflyRunnerSystemFailureRateHigh", "MayflyInstancesLeaking", "MayflyInstanceCreationErrors", "MayflyIdlePoolBelowTarget"} {
		if !alerts[a] {
			t.Errorf("alert %s missing from rules.yml", a)
		}
	}

	// Every alert has a unit test where it fires and one where it does not.
	var tf struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	b, err := os.ReadFile("prometheus/rules_test.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &tf); err != nil {
		t.Fatalf("prometheus/rules_test.yml: %v", err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tg := range tf.Tests {
		for _, at := range tg.AlertRuleTest {
			if len(at.ExpAlerts) > 0 {
				fires[at.Alertname] = true
			} else {
				quiet[at.Alertname] = true
			}
		}
	}
	for a := range alerts {
		if !fires[a] {
			t.Errorf("alert %s: no test in rules_test.yml where it fires", a)
		}
		if !quiet[a] {
			t.Errorf("alert %s: no test in rules_test.yml where it stays quiet", a)
		}
	}
}

// dashboardPanel is the part of a Grafana panel the test reads.
type dashboardPanel struct {
	ID      int               `json:"id"`
	Type    string            `json:"type"`
	Title   string            `json:"title"`
	GridPos map[string]int    `json:"gridPos"`
	Panels  []dashboardPanel  `json:"panels"`
	Targets []json.RawMessage `json:"targets"`
}

func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile("grafana/mayfly.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID        string           `json:"uid"`
		Title      string           `json:"title"`
		Panels     []dashboardPanel `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("grafana/mayfly.json: %v", err)
	}
	if d.UID == "" || d.Title == "" {
		t.Error("dashboard needs a uid and a title")
	}
	known := knownSeries(t)
	used := map[string]bool{}
	check := func(where, expr string) {
		names, err := metricNames(expr)
		if err != nil {
			t.Errorf("%s: %v", where, err)
		}
		for _, m := range names {
			used[m] = true
			if !known[m] {
				t.Errorf("%s: series %q is neither a mayfly metric nor a recording rule in prometheus/rules.yml", where, m)
			}
		}
	}
	for _, v := range d.Templating.List {
		// label_values(series, label): only the series is PromQL.
		if def, ok := strings.CutPrefix(v.Definition, "label_values("); ok {
			if i := strings.LastIndex(def, ","); i > 0 {
				check("variable "+v.Name, def[:i])
			}
		}
	}
	ids := map[int]bool{}
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel %q: duplicate id %d", p.Title, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos["w"] <= 0 || p.GridPos["x"]+p.GridPos["w"] > 24 {
				t.Errorf("panel %q: gridPos %v outside the 24-column grid", p.Title, p.GridPos)
			}
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q: no queries", p.Title)
			}
			for i, raw := range p.Targets {
				var tg struct {
					Expr string `json:"expr"`
				}
				if err := json.Unmarshal(raw, &tg); err != nil || tg.Expr == "" {
					t.Errorf("panel %q target %d: no PromQL expr (%v)", p.Title, i, err)
					continue
				}
				check(fmt.Sprintf("panel %q target %d", p.Title, i), tg.Expr)
			}
		}
	}
	walk(d.Panels)
	// The views the dashboard exists for.
	for _, m := range []string{
		"gitlab_runner_autoscaling_machine_states",                // instances by state
		"mayfly_fleet_idle_target", "mayfly_fleet_idle_instances", // idle target vs actual
		"runner:mayfly_job_queue_to_start_within_120s:ratio_rate30m",        // share within 120 s
		"runner:mayfly_job_queue_to_start_seconds:p50_rate5m",               // p50
		"runner:mayfly_job_queue_to_start_seconds:p90_rate5m",               // p90
		"mayfly_jobs_finished_total",                                        // jobs by outcome
		"runner:mayfly_runner_system_failures:ratio_rate30m",                // system failure rate
		"mayfly_provider_calls_total", "mayfly_fleet_provider_errors_total", // provider by call and op
	} {
		if !used[m] {
			t.Errorf("dashboard has no panel on %s", m)
		}
	}
}

// unit is a systemd unit file: section -> key -> values in order.
type unit map[string]map[string][]string

func parseUnit(r io.Reader) (unit, error) {
	u := unit{}
	section := ""
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				return nil, fmt.Errorf("line %d: want key=value inside a [section]: %q", n, line)
			}
			k = strings.TrimSpace(k)
			u[section][k] = append(u[section][k], strings.TrimSpace(v))
		}
	}
	return u, sc.Err()
}

// last returns the value in force for key (the last assignment).
func (u unit) last(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

func loadUnit(t *testing.T) unit {
	t.Helper()
	f, err := os.Open("systemd/mayfly.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u, err := parseUnit(f)
	if err != nil {
		t.Fatalf("systemd/mayfly.service: %v", err)
	}
	return u
}

// unitSeconds parses a systemd time span in plain seconds or with units
// ("3h 5min").
func unitSeconds(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	r := strings.NewReplacer("min", "m", " ", "")
	return time.ParseDuration(r.Replace(s))
}

func TestSystemdUnit(t *testing.T) {
	u := loadUnit(t)
	svc := "Service"
	if got := u.last(svc, "ExecStart"); !strings.HasPrefix(got, "/usr/local/bin/mayfly run --config /etc/mayfly/config.toml") {
		t.Errorf("ExecStart = %q", got)
	}
	want := map[string]string{
		"KillSignal":      "SIGQUIT", // drain, not abort
		"KillMode":        "mixed",   // SIGQUIT to mayfly only, not to plugins and VMs
		"NoNewPrivileges": "yes",
		"ProtectSystem":   "strict",
		"DeviceAllow":     "/dev/kvm rw",
	}
	for k, v := range want {
		if got := u.last(svc, k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	stop, err := unitSeconds(u.last(svc, "TimeoutStopSec"))
	if err != nil {
		t.Fatalf("TimeoutStopSec: %v", err)
	}
	if stop < hostedJobCap || stop > hostedJobCap+15*time.Minute {
		t.Errorf("TimeoutStopSec = %v, want the 3 h job cap plus a few minutes", stop)
	}
	if !strings.Contains(u.last(svc, "SupplementaryGroups"), "kvm") {
		t.Error("SupplementaryGroups lacks kvm: the qemu plugin could not open /dev/kvm")
	}
	// Options that would break qemu/KVM.
	for k, bad := range map[string]string{"PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes", "PrivateUsers": "yes"} {
		if u.last(svc, k) == bad {
			t.Errorf("%s=%s breaks the qemu plugin", k, bad)
		}
	}

	t.Run("systemd-analyze", func(t *testing.T) {
		sa := requireTool(t, "systemd-analyze")
		// verify wants ExecStart to exist: point it at this test binary.
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile("systemd/mayfly.service")
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "mayfly.service")
		if err := os.WriteFile(path, bytes.ReplaceAll(b, []byte("/usr/local/bin/mayfly"), []byte(exe)), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := run(t, ".", sa, "verify", path)
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "mayfly.service") {
				t.Errorf("systemd-analyze verify: %s", line)
			}
		}
		if err != nil {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	})
}

func TestContainerfile(t *testing.T) {
	b, err := os.ReadFile("container/Containerfile")
	if err != nil {
		t.Fatal(err)
	}
	// Join continuation lines, drop comments.
	text := regexp.MustCompile(`\\\n\s*`).ReplaceAllString(string(b), " ")
	var froms, instr []string
	args := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		instr = append(instr, line)
		op, rest, _ := strings.Cut(line, " ")
		switch strings.ToUpper(op) {
		case "FROM":
			froms = append(froms, rest)
		case "ARG":
			k, v, _ := strings.Cut(rest, "=")
			args[k] = v
		}
	}
	if len(froms) < 2 || !strings.HasSuffix(froms[0], " AS build") {
		t.Fatalf("want a multi-stage build starting with a stage named build, got FROM %q", froms)
	}
	has := func(prefix string) bool {
		return slices.ContainsFunc(instr, func(s string) bool { return strings.HasPrefix(s, prefix) })
	}
	for _, p := range []string{"COPY --from=build ", "STOPSIGNAL SIGQUIT", "EXPOSE 9252", `ENTRYPOINT ["/usr/local/bin/mayfly"]`} {
		if !has(p) {
			t.Errorf("Containerfile lacks %q", p)
		}
	}
	user := ""
	for _, s := range instr {
		if u, ok := strings.CutPrefix(s, "USER "); ok {
			user = u
		}
	}
	if user == "" || strings.HasPrefix(user, "0") || strings.HasPrefix(user, "root") {
		t.Errorf("final USER = %q, want a non-root user", user)
	}
	// The Go version of the build stage matches go.mod's.
	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
	if m == nil || args["GO_VERSION"] != string(m[1]) {
		t.Errorf("ARG GO_VERSION=%s, go.mod says go %s", args["GO_VERSION"], m[1])
	}
	// Every package the image builds exists.
	build := regexp.MustCompile(`\./(?:cmd|plugins)/[\w/-]+`).FindAllString(text, -1)
	if len(build) == 0 {
		t.Fatal("Containerfile builds no ./cmd or ./plugins package")
	}
	if !slices.Contains(build, "./cmd/mayfly") {
		t.Error("Containerfile does not build ./cmd/mayfly")
	}
	for _, p := range build {
		if fi, err := os.Stat(filepath.Join("..", p)); err != nil || !fi.IsDir() {
			t.Errorf("Containerfile builds %s, which is not a directory of the repository", p)
		}
	}
}

// k8sObject is any Kubernetes manifest, decoded generically.
type k8sObject map[string]any

// get walks a path of map keys and list indexes.
func (o k8sObject) get(path ...any) any {
	var cur any = map[string]any(o)
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := cur.(map[string]any)
			if !ok {
				return nil
			}
			cur = m[k]
		case int:
			l, ok := cur.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			cur = l[k]
		}
	}
	return cur
}

func loadManifests(t *testing.T) (map[string]k8sObject, []string) {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no kubernetes/*.yaml: %v", err)
	}
	objs := map[string]k8sObject{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			// Decode into a plain map: yaml.v3 gives nested mappings the
			// type of the outer one.
			var raw map[string]any
			err := dec.Decode(&raw)
			o := k8sObject(raw)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			kind, _ := o["kind"].(string)
			name, _ := o.get("metadata", "name").(string)
			if kind == "" || o["apiVersion"] == nil {
				t.Fatalf("%s: a document without kind or apiVersion", f)
			}
			if kind != "Kustomization" && name == "" {
				t.Fatalf("%s: %s without metadata.name", f, kind)
			}
			objs[kind+"/"+name] = o
		}
	}
	return objs, files
}

func TestKubernetes(t *testing.T) {
	objs, files := loadManifests(t)
	need := func(key string) k8sObject {
		t.Helper()
		o, ok := objs[key]
		if !ok {
			t.Fatalf("no %s in kubernetes/", key)
		}
		return o
	}

	// The kustomization lists exactly the other files.
	var listed []string
	for _, r := range need("Kustomization/").get("resources").([]any) {
		listed = append(listed, "kubernetes/"+r.(string))
	}
	var others []string
	for _, f := range files {
		if filepath.Base(f) != "kustomization.yaml" {
			others = append(others, f)
		}
	}
	slices.Sort(listed)
	if !slices.Equal(listed, others) {
		t.Errorf("kustomization resources %q, files %q", listed, others)
	}

	dep := need("Deployment/mayfly")
	spec := func(path ...any) any { return dep.get(append([]any{"spec"}, path...)...) }
	if got := spec("replicas"); got != 1 {
		t.Errorf("replicas = %v, want 1", got)
	}
	if got := spec("strategy", "type"); got != "Recreate" {
		t.Errorf("strategy = %v, want Recreate (two managers with one id must not overlap)", got)
	}
	grace, _ := spec("template", "spec", "terminationGracePeriodSeconds").(int)
	if d := time.Duration(grace) * time.Second; d < hostedJobCap {
		t.Errorf("terminationGracePeriodSeconds = %d, shorter than the 3 h job cap", grace)
	}
	stop, err := unitSeconds(loadUnit(t).last("Service", "TimeoutStopSec"))
	if err != nil || stop != time.Duration(grace)*time.Second {
		t.Errorf("terminationGracePeriodSeconds %ds differs from the systemd unit's TimeoutStopSec %v (%v)", grace, stop, err)
	}
	c := k8sObject(spec("template", "spec", "containers", 0).(map[string]any))
	if c["name"] != "mayfly" {
		t.Fatalf("first container is %v, want mayfly", c["name"])
	}
	preStop := fmt.Sprint(c.get("lifecycle", "preStop", "exec", "command"))
	if !strings.Contains(preStop, "kill -QUIT 1") {
		t.Errorf("preStop %s does not send SIGQUIT to mayfly", preStop)
	}
	args := fmt.Sprint(c.get("args"))
	if !strings.Contains(args, "--config /etc/mayfly/config.toml") {
		t.Errorf("args %s do not read /etc/mayfly/config.toml", args)
	}
	if c.get("securityContext", "allowPrivilegeEscalation") != false || spec("template", "spec", "securityContext", "runAsNonRoot") != true {
		t.Error("the pod must run as non-root without privilege escalation")
	}
	port, _ := c.get("ports", 0, "containerPort").(int)
	portName := c.get("ports", 0, "name")

	// Referenced ConfigMap, Secret and ServiceAccount exist.
	need("ServiceAccount/" + spec("template", "spec", "serviceAccountName").(string))
	var cmName string
	for _, v := range spec("template", "spec", "volumes").([]any) {
		if n, ok := k8sObject(v.(map[string]any)).get("configMap", "name").(string); ok {
			cmName = n
		}
	}
	cm := need("ConfigMap/" + cmName)
	tokenSet := false
	for _, ic := range spec("template", "spec", "initContainers").([]any) {
		for _, e := range k8sObject(ic.(map[string]any)).get("env").([]any) {
			ref := k8sObject(e.(map[string]any))
			name, _ := ref.get("valueFrom", "secretKeyRef", "name").(string)
			key, _ := ref.get("valueFrom", "secretKeyRef", "key").(string)
			if name == "" {
				continue
			}
			if need("Secret/"+name).get("stringData", key) == nil {
				t.Errorf("Secret %s has no key %s", name, key)
			}
			tokenSet = true
		}
	}
	if !tokenSet {
		t.Error("no init container takes the token from a Secret")
	}

	// The Service selects the pod and exposes its metrics port.
	svc := need("Service/mayfly-metrics")
	podLabels := spec("template", "metadata", "labels").(map[string]any)
	for k, v := range svc.get("spec", "selector").(map[string]any) {
		if podLabels[k] != v {
			t.Errorf("Service selector %s=%v does not match the pod (%v)", k, v, podLabels[k])
		}
	}
	if svc.get("spec", "ports", 0, "targetPort") != portName || svc.get("spec", "ports", 0, "port") != port {
		t.Errorf("Service port %v -> %v, container port %v %v", svc.get("spec", "ports", 0, "port"), svc.get("spec", "ports", 0, "targetPort"), portName, port)
	}

	// config.toml is a valid mayfly config once the token is in, and serves
	// metrics on the container port.
	toml, _ := cm.get("data", "config.toml").(string)
	if !strings.Contains(toml, "@RUNNER_TOKEN@") {
		t.Error("config.toml has no @RUNNER_TOKEN@ placeholder: the token would sit in the ConfigMap")
	}
	cfg, err := config.Parse("configmap.yaml:config.toml", []byte(strings.ReplaceAll(toml, "@RUNNER_TOKEN@", "glrt-test-token")))
	if err != nil {
		t.Fatalf("config.toml in the ConfigMap: %v", err)
	}
	_, p, err := net.SplitHostPort(cfg.ListenAddress)
	if err != nil || p != strconv.Itoa(port) {
		t.Errorf("listen_address %q does not serve on the container port %d", cfg.ListenAddress, port)
	}
	if len(cfg.Runners) == 0 {
		t.Fatal("config.toml has no runners")
	}
	r := cfg.Runners[0]
	if r.MaxJobTimeout != hostedJobCap || r.Fleet.MaxUses != 1 || r.Fleet.Provider != "gce" {
		t.Errorf("runner %s: max job timeout %v, max uses %d, provider %q; want 3h, 1, gce", r.Name, r.MaxJobTimeout, r.Fleet.MaxUses, r.Fleet.Provider)
	}
	// The hosted fleet's idle counts: 50, 70 at weekends, 700 at night.
	for _, tc := range []struct {
		at   string
		idle int
	}{
		{"2026-06-03T12:00:00Z", 50},  // Wednesday
		{"2026-06-06T12:00:00Z", 70},  // Saturday
		{"2026-06-03T03:45:00Z", 700}, // nightly spike
		{"2026-06-03T04:15:00Z", 700},
		{"2026-06-03T04:45:00Z", 50},
	} {
		at, _ := time.Parse(time.RFC3339, tc.at)
		if p, _ := r.Fleet.Schedule.At(at); p.IdleCount != tc.idle {
			t.Errorf("idle count at %s = %d, want %d", tc.at, p.IdleCount, tc.idle)
		}
	}
}
