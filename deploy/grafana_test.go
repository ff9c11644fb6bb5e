package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
)

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
