package config

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/manager/helper"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/schedule"
)

// WriteSummary prints what the config asks for: each runner, its provider,
// and the idle policy in force at now and after the next period change.
func WriteSummary(w io.Writer, cfg *Config, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format, args...) }
	p("config\t%s\n", cfg.Path)
	p("concurrent\t%d jobs\n", cfg.Concurrent)
	p("check_interval\t%s\n", cfg.CheckInterval)
	if cfg.ListenAddress != "" {
		p("metrics\thttp://%s/metrics\n", cfg.ListenAddress)
	}
	for _, r := range cfg.Runners {
		f := r.Fleet
		p("\nrunner %q at %s (token %s)\n", r.Name, r.URL, redact(r.Token))
		p("  executor\t%s, shell %s, builds in %s\n", r.Executor, r.Shell, r.BuildsDir)
		p("  provider\t%s (from [%s])%s\n", f.Provider, f.Block, options(f))
		p("  instances\t%s, %s, %s\n", limitText(f.MaxInstances, "instances"), growthText(f.MaxGrowthRate), usesText(f.MaxUses))
		p("  jobs\t%s, hard timeout %s\n", limitText(r.Limit, "jobs"), r.MaxJobTimeout)
		p("  images\t%s\n", dockerText(r.Docker))
		p("  on demand\t%s\n", onDemandText(f))
		p("  GitLab away\t%s\n", gitlabAwayText())
		p("  provider list\t%s\n", listText(f))
		p("  connector\t%s over %s, %s/%s, connect timeout %s\n", userText(f.Connector.Username), f.Connector.Protocol, f.Connector.OS, f.Connector.Arch, f.Connector.Timeout)
		pol, idx := f.Schedule.At(now)
		p("  now\t%s: %s\n", now.UTC().Format(time.RFC3339), policyText(pol, entryText(f.Schedule, idx)))
		if next, ok := f.Schedule.NextChange(now); ok {
			np, nidx := f.Schedule.At(next)
			p("  next change\t%s (in %s): %s\n", next.UTC().Format(time.RFC3339), next.Sub(now).Round(time.Second), policyText(np, entryText(f.Schedule, nidx)))
		} else {
			p("  next change\tnone: this policy is always in force\n")
		}
	}
	if len(cfg.Warnings) > 0 {
		p("\nwarnings\n")
		for _, wn := range cfg.Warnings {
			p("  %s\n", wn)
		}
	}
	if hasPeriods(cfg) {
		p("\nnote\tmayfly puts a time in a period when that second matches; gitlab-runner tests the next second, so its windows open and close one second early.\n")
	}
	return tw.Flush()
}

// dockerText says where jobs with an image run.
func dockerText(d *Docker) string {
	if d == nil {
		return "not used: every job runs in the VM's own shell"
	}
	s := "jobs with an image run in containers on the VM's Docker Engine (" + d.Host + ")"
	if d.Image != "" {
		s += ", default image " + d.Image
	} else {
		s += ", jobs without one in the VM's shell"
	}
	if d.Privileged {
		s += ", privileged"
	}
	return s + ", pull policy " + strings.Join(d.PullPolicy, " then ")
}

// onDemandText says when a job is taken before a VM is idle, and how that
// differs from gitlab-runner.
func onDemandText(f Fleet) string {
	if f.OnDemandWithin <= 0 {
		return "off: a job is taken only for an idle VM (always on demand while IdleCount is 0)"
	}
	return fmt.Sprintf("on: when no VM is idle a job is taken and a VM created for it, whatever the boot time; at max instances, max growth rate or in a creation backoff, only for a VM expected within %s (mayfly; gitlab-runner waits for an idle VM unless IdleCount is 0)", f.OnDemandWithin)
}

// gitlabAwayText says how a job's artifact transfers ride out GitLab
// being away, and how that differs from gitlab-runner.
func gitlabAwayText() string {
	return fmt.Sprintf("artifact uploads and downloads retry 5xx, 429, 408 and connections refused or cut for %s, pausing 1 s doubling to %s or as Retry-After says; 403 and 413 fail at once (mayfly; gitlab-runner's helper gives up after 6 tries on 503, 3 on other errors, 1 to 5 s apart, so a minute of 503s fails jobs whose script passed)",
		helper.GitLabRetryBudget, helper.GitLabMaxRetryWait)
}

// listText says how often the fleet reads the provider's list, which is
// also how soon it notices a VM preempted or deleted behind its back.
func listText(f Fleet) string {
	every := func(d time.Duration, def string) string {
		if d <= 0 {
			return def
		}
		return d.String()
	}
	booting := f.ListIntervalBooting
	if booting <= 0 {
		booting = fleet.DefaultListIntervalBooting
	}
	text := fmt.Sprintf("every %s, every %s while VMs boot (how soon a preempted VM is noticed)", every(f.ListInterval, "1m (default)"), every(f.ListIntervalBooting, "2s (default)"))
	ramp := fleet.BootRampOffsets(booting)
	if len(ramp) == 0 {
		return text
	}
	times := make([]string, len(ramp))
	for i, d := range ramp {
		times[i] = d.String()
	}
	last := len(times) - 1
	return fmt.Sprintf("%s; also %s and %s after a creation while boots are shorter than that, or none was seen yet (mayfly; taskscaler lists only at update_interval_when_expecting, so a VM that runs at once waits for it)",
		text, strings.Join(times[:last], ", "), times[last])
}

func policyText(p schedule.Policy, from string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "idle %d", p.IdleCount)
	if p.Predictive {
		if p.PredictiveWithin > 0 {
			fmt.Fprintf(&b, " (at most; predictive, quantile %g of the jobs to start within %s: the pool covers the jobs expected in a boot time less that)", p.Quantile(), p.PredictiveWithin)
		} else {
			fmt.Fprintf(&b, " (at most; predictive, quantile %g of the jobs expected within one boot time)", p.Quantile())
		}
	} else if p.ScaleFactor > 0 {
		if p.Style == schedule.Taskscaler {
			fmt.Fprintf(&b, " (at least; %g per instance in use", p.ScaleFactor)
			if p.ScaleFactorLimit > 0 {
				fmt.Fprintf(&b, ", at most %d", p.ScaleFactorLimit)
			}
			b.WriteString(")")
		} else {
			fmt.Fprintf(&b, " (at most; %g per instance in use, at least %d)", p.ScaleFactor, max(p.IdleCountMin, 1))
		}
	}
	fmt.Fprintf(&b, ", idle time %s", p.IdleTime)
	if p.Style == schedule.Taskscaler {
		fmt.Fprintf(&b, ", preemptive %v", p.PreemptiveMode)
	}
	return b.String() + " [" + from + "]"
}

func entryText(s schedule.Schedule, idx int) string {
	if idx == schedule.NoEntry {
		return "default"
	}
	var periods []string
	for _, p := range s.Entries[idx].Periods {
		periods = append(periods, fmt.Sprintf("%q", p.String()))
	}
	loc := ""
	if len(s.Entries[idx].Periods) > 0 {
		loc = " " + s.Entries[idx].Periods[0].Location().String()
	}
	return fmt.Sprintf("period %d: %s%s", idx, strings.Join(periods, ", "), loc)
}

// options lists the provider's settings with their secrets redacted
// (providers.RedactSettings): passwords, tokens, secret keys, private keys
// and the private parts of credentials files pasted inline.
func options(f Fleet) string {
	if len(f.ProviderOptions) == 0 && len(f.ProviderConfig) == 0 {
		return ""
	}
	var kv []string
	for k, v := range providers.RedactSettings(f.ProviderOptions).(map[string]string) {
		kv = append(kv, k+"="+v)
	}
	for k, v := range providers.RedactSettings(f.ProviderConfig).(map[string]any) {
		kv = append(kv, fmt.Sprintf("%s=%v", k, v))
	}
	sort.Strings(kv)
	return "\n  options\t" + strings.Join(kv, " ")
}

func limitText(n int, what string) string {
	if n == 0 {
		return "no limit on " + what
	}
	return fmt.Sprintf("at most %d %s", n, what)
}

func growthText(n int) string {
	if n == 0 {
		return "creations not rate-limited"
	}
	return fmt.Sprintf("at most %d being created", n)
}

func usesText(n int) string {
	if n == 1 {
		return "each VM runs one job and is deleted"
	}
	return fmt.Sprintf("each VM runs up to %d jobs", n)
}

func userText(u string) string {
	if u == "" {
		return "provider's user"
	}
	return u
}

func redact(token string) string {
	if len(token) <= 8 {
		return "[set]"
	}
	return token[:8] + "…"
}

func hasPeriods(cfg *Config) bool {
	for _, r := range cfg.Runners {
		if len(r.Fleet.Schedule.Entries) > 0 {
			return true
		}
	}
	return false
}
