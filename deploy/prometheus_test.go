package deploy

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

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
