package config

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Executors mayfly accepts, and the block each needs.
var executorBlocks = map[string]string{
	"docker+machine":    "machine",
	"docker-autoscaler": "autoscaler",
	"instance":          "autoscaler",
}

// providerAliases maps docker-machine driver names and fleeting plugin names
// to mayfly's provider plugins.
var providerAliases = map[string]string{
	"google":                        "gce",
	"googlecompute":                 "gce",
	"fleeting-plugin-googlecompute": "gce",
	"amazonec2":                     "aws",
	"fleeting-plugin-aws":           "aws",
}

var (
	logLevels  = []string{"debug", "info", "warn", "warning", "error", "fatal", "panic"}
	logFormats = []string{"runner", "text", "json"}
	shells     = []string{"bash", "sh", "pwsh", "powershell"}
)

// builder turns the decoded file into the model, collecting every error.
type builder struct {
	file     string
	pos      positions
	errs     ErrorList
	warnings []Warning
}

func (b *builder) errorf(key, format string, args ...any) {
	at, _ := b.pos.lookup(key)
	b.errs = append(b.errs, &Error{File: b.file, Line: at.line, Column: at.column, Key: key, Message: fmt.Sprintf(format, args...)})
}

func (b *builder) warnf(key, format string, args ...any) {
	at, _ := b.pos.lookup(key)
	b.warnings = append(b.warnings, Warning{File: b.file, Line: at.line, Column: at.column, Key: key, Message: fmt.Sprintf(format, args...)})
}

// unknownKey reports a key the strict decoder did not place: a warning when
// gitlab-runner accepts it, otherwise an error with a suggestion.
func (b *builder) unknownKey(e *toml.DecodeError) {
	parts := e.Key()
	line, col := e.Position()
	key := strings.Join(parts, ".")
	for i := len(parts); i > 0; i-- {
		if why, ok := ignoredKeys[strings.Join(parts[:i], ".")]; ok {
			b.warnings = append(b.warnings, Warning{File: b.file, Line: line, Column: col, Key: key, Message: "ignored: " + why})
			return
		}
	}
	msg := "unknown key"
	if s := suggest(parts); s != "" {
		msg += fmt.Sprintf(" (did you mean %q?)", s)
	}
	b.errs = append(b.errs, &Error{File: b.file, Line: line, Column: col, Key: key, Message: msg})
}

// suggest finds a known key close to the last part of parts, in the table
// that parts names.
func suggest(parts []string) string {
	t := reflect.TypeOf(fileConfig{})
	for _, p := range parts[:len(parts)-1] {
		f, ok := fieldByTag(t, p)
		if !ok {
			return ""
		}
		t = f.Type
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct {
			return ""
		}
	}
	want := strings.ToLower(parts[len(parts)-1])
	best, bestDist := "", 3
	for i := 0; i < t.NumField(); i++ {
		tag, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
		if d := editDistance(want, strings.ToLower(tag)); d < bestDist {
			best, bestDist = tag, d
		}
	}
	return best
}

func fieldByTag(t reflect.Type, tag string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ","); name == tag {
			return t.Field(i), true
		}
	}
	return reflect.StructField{}, false
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// nonNegative returns *v (or def when unset), reporting a negative value.
func (b *builder) nonNegative(key string, v *int, def int) int {
	if v == nil {
		return def
	}
	if *v < 0 {
		b.errorf(key, "must not be negative, got %d", *v)
		return def
	}
	return *v
}

// seconds reads a whole number of seconds that must not be negative.
func (b *builder) seconds(key string, v *int, def time.Duration) time.Duration {
	if v == nil {
		return def
	}
	return time.Duration(b.nonNegative(key, v, int(def/time.Second))) * time.Second
}

// duration reads a duration that must not be negative.
func (b *builder) duration(key string, v *duration, def time.Duration) time.Duration {
	switch {
	case v == nil:
		return def
	case *v < 0:
		b.errorf(key, "must not be negative, got %s", time.Duration(*v))
		return def
	}
	return time.Duration(*v)
}

func (b *builder) oneOf(key, v string, allowed []string) {
	if v != "" && !slices.Contains(allowed, v) {
		b.errorf(key, "%q is not one of %s", v, strings.Join(allowed, ", "))
	}
}

func (b *builder) build(raw *fileConfig) *Config {
	cfg := &Config{
		Concurrent:      DefaultConcurrent,
		CheckInterval:   DefaultCheckInterval,
		ListenAddress:   raw.ListenAddress,
		LogLevel:        raw.LogLevel,
		LogFormat:       raw.LogFormat,
		ShutdownTimeout: DefaultShutdownTimeout,
	}
	if raw.Concurrent != nil {
		if *raw.Concurrent < 1 {
			b.errorf("concurrent", "must be at least 1, got %d", *raw.Concurrent)
		} else {
			cfg.Concurrent = *raw.Concurrent
		}
	}
	// As in gitlab-runner, a check_interval of zero or less means the default.
	if raw.CheckInterval != nil && *raw.CheckInterval > 0 {
		cfg.CheckInterval = time.Duration(*raw.CheckInterval) * time.Second
	}
	if s := b.nonNegative("shutdown_timeout", raw.ShutdownTimeout, 0); s > 0 {
		cfg.ShutdownTimeout = time.Duration(s) * time.Second
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "info"
	}
	b.oneOf("log_level", cfg.LogLevel, logLevels)
	if cfg.LogFormat == "" {
		cfg.LogFormat = "runner"
	}
	b.oneOf("log_format", cfg.LogFormat, logFormats)
	if a := raw.ListenAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			b.errorf("listen_address", "want host:port: %v", err)
		}
	}
	if len(raw.Runners) == 0 {
		b.errorf("runners", "no [[runners]] entry: mayfly needs at least one runner")
	}
	names := map[string]int{}
	for i := range raw.Runners {
		r := b.runner(i, &raw.Runners[i])
		if prev, dup := names[r.Name]; dup {
			b.errorf(fmt.Sprintf("runners[%d].name", i), "runner name %q is already used by runners[%d]", r.Name, prev)
		}
		names[r.Name] = i
		r.Fleet.CheckInterval = cfg.CheckInterval
		r.Fleet.BootTimeout = r.Fleet.Connector.Timeout
		cfg.Runners = append(cfg.Runners, r)
	}
	return cfg
}

func (b *builder) runner(i int, raw *fileRunner) Runner {
	key := func(k string) string { return fmt.Sprintf("runners[%d].%s", i, k) }
	r := Runner{
		Name:            raw.Name,
		URL:             raw.URL,
		Token:           raw.Token,
		Executor:        raw.Executor,
		Shell:           raw.Shell,
		BuildsDir:       raw.BuildsDir,
		Environment:     raw.Environment,
		PreCloneScript:  raw.PreCloneScript,
		PostCloneScript: raw.PostCloneScript,
		PreBuildScript:  raw.PreBuildScript,
		PostBuildScript: raw.PostBuildScript,
		MaxJobTimeout:   DefaultMaxJobTimeout,
	}
	if r.Name == "" {
		r.Name = fmt.Sprintf("runner-%d", i+1)
	}
	if r.URL == "" {
		b.errorf(key("url"), "is required")
	} else if u, err := url.Parse(r.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		b.errorf(key("url"), "want an http:// or https:// URL with a host, got %q", r.URL)
	}
	if r.Token == "" {
		b.errorf(key("token"), "is required (the runner authentication token)")
	}
	r.Limit = b.nonNegative(key("limit"), raw.Limit, 0)
	r.RequestConcurrency = b.nonNegative(key("request_concurrency"), raw.RequestConcurrency, DefaultRequestConcurrency)
	if r.RequestConcurrency == 0 {
		r.RequestConcurrency = DefaultRequestConcurrency
	}
	r.OutputLimitKB = b.nonNegative(key("output_limit"), raw.OutputLimit, DefaultOutputLimitKB)
	if r.OutputLimitKB == 0 {
		r.OutputLimitKB = DefaultOutputLimitKB
	}
	if raw.MaxJobTimeout != nil {
		if *raw.MaxJobTimeout <= 0 {
			b.errorf(key("max_job_timeout"), "must be a positive number of seconds, got %d", *raw.MaxJobTimeout)
		} else {
			r.MaxJobTimeout = time.Duration(*raw.MaxJobTimeout) * time.Second
		}
	}
	if raw.PreCloneScript != "" && raw.PreGetSources != "" {
		b.errorf(key("pre_get_sources_script"), "set either pre_get_sources_script or its old name pre_clone_script, not both")
	} else if raw.PreGetSources != "" {
		r.PreCloneScript = raw.PreGetSources
	}
	if raw.PostCloneScript != "" && raw.PostGetSources != "" {
		b.errorf(key("post_get_sources_script"), "set either post_get_sources_script or its old name post_clone_script, not both")
	} else if raw.PostGetSources != "" {
		r.PostCloneScript = raw.PostGetSources
	}
	for j, kv := range raw.Environment {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			b.errorf(fmt.Sprintf("runners[%d].environment[%d]", i, j), "want KEY=value, got %q", kv)
		}
	}

	block, known := executorBlocks[r.Executor]
	switch {
	case r.Executor == "":
		b.errorf(key("executor"), "is required: docker+machine, instance or docker-autoscaler")
	case !known:
		b.errorf(key("executor"), "%q is not supported: mayfly runs each job in its own autoscaled VM; use docker+machine, instance or docker-autoscaler", r.Executor)
	}
	switch {
	case raw.Machine != nil && raw.Autoscaler != nil:
		b.errorf(key("autoscaler"), "a runner takes [runners.machine] or [runners.autoscaler], not both")
	case block == "machine" && raw.Machine == nil:
		b.errorf(key("executor"), "executor %q needs a [runners.machine] section", r.Executor)
	case block == "autoscaler" && raw.Autoscaler == nil:
		b.errorf(key("executor"), "executor %q needs a [runners.autoscaler] section", r.Executor)
	case raw.Machine != nil:
		r.Fleet = b.machine(key("machine"), raw.Machine, r.Limit)
	case raw.Autoscaler != nil:
		r.Fleet = b.autoscaler(key("autoscaler"), raw.Autoscaler)
	}
	r.Docker = b.docker(key("docker"), raw.Docker, r.Executor, r.Fleet.Connector.OS)
	r.Cache = b.cache(key("cache"), raw.Cache)
	if r.Docker != nil && r.Docker.Image == "" {
		b.warnf(key("executor"), "jobs that name no image run in the VM's own shell, as no [runners.docker] image is set (gitlab-runner's %s executor fails them)", r.Executor)
	}

	if r.Shell == "" {
		r.Shell = "bash"
		if r.Fleet.Connector.OS == "windows" {
			r.Shell = "pwsh"
		}
	}
	b.oneOf(key("shell"), r.Shell, shells)
	if r.BuildsDir == "" {
		r.BuildsDir = "/builds"
		if r.Fleet.Connector.OS == "windows" {
			r.BuildsDir = `C:\builds`
		}
	}
	return r
}

func (b *builder) machine(key string, m *fileMachine, limit int) Fleet {
	k := func(s string) string { return key + "." + s }
	f := Fleet{
		Block:        "runners.machine",
		Provider:     provider(m.MachineDriver),
		NameTemplate: m.MachineName,
		Limits: fleet.Limits{
			MaxGrowthRate:  b.nonNegative(k("MaxGrowthRate"), m.MaxGrowthRate, 0),
			MaxInstances:   limit, // docker+machine's limit caps machines in every state
			OnDemandWithin: b.seconds(k("OnDemandWithin"), m.OnDemandWithin, DefaultOnDemandWithin),
			MaxUses:        b.nonNegative(k("MaxBuilds"), m.MaxBuilds, 0),
		},
		Connector: Connector{OS: "linux", Arch: "amd64", Protocol: "ssh", Timeout: DefaultConnectTimeout},
	}
	if m.MachineDriver == "" {
		b.errorf(k("MachineDriver"), "is required: it names the provider plugin (for example qemu, google, amazonec2)")
	}
	if m.MachineName == "" {
		b.errorf(k("MachineName"), "is required, with %%s where the unique part of each name goes")
	} else if strings.Count(m.MachineName, "%s") != 1 {
		b.errorf(k("MachineName"), "must contain %%s exactly once, got %q", m.MachineName)
	}
	f.ProviderOptions = map[string]string{}
	for j, opt := range m.MachineOptions {
		name, val, hasVal := strings.Cut(opt, "=")
		if name == "" {
			b.errorf(fmt.Sprintf("%s[%d]", k("MachineOptions"), j), "want name=value or a flag name, got %q", providers.RedactOption(opt))
			continue
		}
		if !hasVal {
			val = "true"
		}
		f.ProviderOptions[name] = val
	}
	f.MaxUses = b.maxUses(k("MaxBuilds"), m.MaxBuilds)

	f.Schedule.Default = b.machinePolicy(key, m.IdleCount, m.IdleCountMin, m.IdleScaleFactor, m.IdleTime)
	b.predictive(&f.Schedule.Default, key, "IdlePredictive", "IdlePredictiveQuantile", m.IdlePredictive, m.IdlePredictiveQuantile)
	b.predictiveWithin(&f.Schedule.Default, key+".IdlePredictiveWithin", m.IdlePredictiveWithin != nil, b.seconds(key+".IdlePredictiveWithin", m.IdlePredictiveWithin, 0))
	for j := range m.Autoscaling {
		a := &m.Autoscaling[j]
		ak := fmt.Sprintf("%s[%d]", k("autoscaling"), j)
		e := schedule.Entry{Policy: b.machinePolicy(ak, a.IdleCount, a.IdleCountMin, a.IdleScaleFactor, a.IdleTime)}
		b.predictive(&e.Policy, ak, "IdlePredictive", "IdlePredictiveQuantile", a.IdlePredictive, a.IdlePredictiveQuantile)
		b.predictiveWithin(&e.Policy, ak+".IdlePredictiveWithin", a.IdlePredictiveWithin != nil, b.seconds(ak+".IdlePredictiveWithin", a.IdlePredictiveWithin, 0))
		e.Periods = b.periods(ak, "Periods", "Timezone", a.Periods, a.Timezone, schedule.DockerMachine)
		f.Schedule.Entries = append(f.Schedule.Entries, e)
	}
	return f
}

// machinePolicy validates one set of docker+machine idle values. As in
// gitlab-runner, an autoscaling entry's unset values are zero, not the root's.
func (b *builder) machinePolicy(key string, idleCount, idleCountMin *int, factor *float64, idleTime *int) schedule.Policy {
	p := schedule.Policy{
		Style:        schedule.DockerMachine,
		IdleCount:    b.nonNegative(key+".IdleCount", idleCount, 0),
		IdleCountMin: b.nonNegative(key+".IdleCountMin", idleCountMin, 0),
		IdleTime:     time.Duration(b.nonNegative(key+".IdleTime", idleTime, 0)) * time.Second,
	}
	if factor != nil {
		if *factor < 0 {
			b.errorf(key+".IdleScaleFactor", "must not be negative, got %g", *factor)
		}
		p.ScaleFactor = *factor
	}
	if p.ScaleFactor > 0 {
		switch {
		case idleCountMin == nil:
			p.IdleCountMin = 1 // gitlab-runner's documented default
		case *idleCountMin < 1:
			b.errorf(key+".IdleCountMin", "must be at least 1 when IdleScaleFactor is set, got %d", *idleCountMin)
		case *idleCountMin > p.IdleCount:
			b.warnf(key+".IdleCountMin", "is above IdleCount (%d), which caps the scaled target, so IdleCountMin has no effect", p.IdleCount)
		}
	}
	return p
}

// predictive reads the predictive-mode keys of one policy (key.onKey and
// key.qKey). The quantile must be in (0,1); it defaults to
// schedule.DefaultPredictiveQuantile.
func (b *builder) predictive(p *schedule.Policy, key, onKey, qKey string, on *bool, q *float64) {
	p.Predictive = on != nil && *on
	if q == nil {
		if p.Predictive {
			p.PredictiveQuantile = schedule.DefaultPredictiveQuantile
		}
		return
	}
	if !(*q > 0 && *q < 1) {
		b.errorf(key+"."+qKey, "must be in (0,1), got %g", *q)
		return
	}
	p.PredictiveQuantile = *q
	if !p.Predictive {
		b.warnf(key+"."+qKey, "has no effect unless %s is true", onKey)
	}
}

// predictiveWithin sets the predictive pool's latency target of one
// policy, read from key (set: the key was given).
func (b *builder) predictiveWithin(p *schedule.Policy, key string, set bool, within time.Duration) {
	p.PredictiveWithin = within
	if set && !p.Predictive {
		b.warnf(key, "has no effect unless the policy is predictive")
	}
}

// maxUses reads MaxBuilds or max_use_count. Unset or 0 means unlimited reuse
// in gitlab-runner; mayfly keeps VMs single use unless told otherwise.
func (b *builder) maxUses(key string, v *int) int {
	switch {
	case v == nil:
		return 1
	case *v == 0:
		b.warnf(key, "0 means unlimited reuse in gitlab-runner; mayfly uses each VM for one job")
		return 1
	case *v > 1:
		b.warnf(key, "each VM runs up to %d jobs: jobs on one VM are not isolated from each other", *v)
	}
	return max(*v, 1)
}

func (b *builder) autoscaler(key string, a *fileAutoscaler) Fleet {
	k := func(s string) string { return key + "." + s }
	f := Fleet{
		Block:          "runners.autoscaler",
		Provider:       provider(a.Plugin),
		ProviderConfig: a.PluginConfig,
		Limits: fleet.Limits{
			MaxGrowthRate:       b.nonNegative(k("max_growth_rate"), a.MaxGrowthRate, 0),
			MaxInstances:        b.nonNegative(k("max_instances"), a.MaxInstances, 0),
			OnDemandWithin:      b.duration(k("on_demand_within"), a.OnDemandWithin, DefaultOnDemandWithin),
			ListInterval:        b.duration(k("update_interval"), a.UpdateInterval, 0),
			ListIntervalBooting: b.duration(k("update_interval_when_expecting"), a.UpdateIntervalExpecting, 0),
			MaxUses:             b.maxUses(k("max_use_count"), a.MaxUseCount),
		},
		InstanceReadyCommand: a.InstanceReadyCommand,
		DeleteOnShutdown:     a.DeleteInstancesOnShutdown,
		Connector:            b.connector(k("connector_config"), &a.ConnectorConfig),
	}
	if a.Plugin == "" {
		b.errorf(k("plugin"), "is required: it names the provider plugin (for example qemu, gce, aws)")
	}
	if c := a.CapacityPerInstance; c != nil && *c != 1 {
		b.errorf(k("capacity_per_instance"), "must be 1: mayfly runs exactly one job per VM, got %d", *c)
	}
	if a.MaxUseCount != nil && *a.MaxUseCount < 0 {
		b.errorf(k("max_use_count"), "must not be negative, got %d", *a.MaxUseCount)
	}
	f.Schedule.Default = schedule.Policy{Style: schedule.Taskscaler}
	for j := range a.Policy {
		p := &a.Policy[j]
		pk := fmt.Sprintf("%s[%d]", k("policy"), j)
		pol := schedule.Policy{
			Style:            schedule.Taskscaler,
			IdleCount:        b.nonNegative(pk+".idle_count", p.IdleCount, 0),
			ScaleFactorLimit: b.nonNegative(pk+".scale_factor_limit", p.ScaleFactorLimit, 0),
		}
		if p.IdleTime != nil {
			if *p.IdleTime < 0 {
				b.errorf(pk+".idle_time", "must not be negative, got %s", time.Duration(*p.IdleTime))
			}
			pol.IdleTime = time.Duration(*p.IdleTime)
		}
		if p.ScaleFactor != nil {
			if *p.ScaleFactor < 0 {
				b.errorf(pk+".scale_factor", "must not be negative, got %g", *p.ScaleFactor)
			}
			pol.ScaleFactor = *p.ScaleFactor
		}
		// gitlab-runner: preemptive mode defaults to on when idle_count > 0.
		pol.PreemptiveMode = pol.IdleCount > 0
		if p.PreemptiveMode != nil {
			pol.PreemptiveMode = *p.PreemptiveMode
		}
		b.predictive(&pol, pk, "predictive", "predictive_quantile", p.Predictive, p.PredictiveQuantile)
		b.predictiveWithin(&pol, pk+".predictive_within", p.PredictiveWithin != nil, b.duration(pk+".predictive_within", p.PredictiveWithin, 0))
		periods := p.Periods
		if len(periods) == 0 {
			periods = []string{"* * * * *"}
		}
		e := schedule.Entry{Policy: pol, Periods: b.periods(pk, "periods", "timezone", periods, p.Timezone, schedule.Taskscaler)}
		f.Schedule.Entries = append(f.Schedule.Entries, e)
	}
	return f
}

func (b *builder) connector(key string, c *fileConnector) Connector {
	out := Connector{
		OS:                   c.OS,
		Arch:                 c.Arch,
		Protocol:             c.Protocol,
		Username:             c.Username,
		Password:             c.Password,
		KeyPath:              c.KeyPath,
		UseStaticCredentials: c.UseStaticCredentials,
		Timeout:              DefaultConnectTimeout,
		UseExternalAddr:      c.UseExternalAddr,
	}
	if out.OS == "" {
		out.OS = "linux"
	}
	b.oneOf(key+".os", out.OS, []string{"linux", "windows"})
	if out.Arch == "" {
		out.Arch = "amd64"
	}
	if out.Protocol == "" {
		out.Protocol = "ssh"
		if out.OS == "windows" {
			out.Protocol = "winrm"
		}
	}
	b.oneOf(key+".protocol", out.Protocol, []string{"ssh", "winrm"})
	if c.Timeout != nil {
		if *c.Timeout <= 0 {
			b.errorf(key+".timeout", "must be positive, got %s", time.Duration(*c.Timeout))
		} else {
			out.Timeout = time.Duration(*c.Timeout)
		}
	}
	if out.KeyPath != "" {
		if _, err := os.Stat(out.KeyPath); err != nil {
			b.errorf(key+".key_path", "cannot read the key file: %v", err)
		}
	}
	if out.UseStaticCredentials && out.Password == "" && out.KeyPath == "" {
		b.errorf(key+".use_static_credentials", "needs a password or key_path")
	}
	return out
}

// periods compiles an entry's period expressions in its timezone.
func (b *builder) periods(key, periodsKey, tzKey string, exprs []string, tz string, style schedule.Style) []schedule.Period {
	loc := time.Local // gitlab-runner's default for an empty timezone
	if tz != "" {
		l, err := time.LoadLocation(tz)
		if err != nil {
			b.errorf(key+"."+tzKey, "unknown timezone %q: want an IANA name such as UTC or Europe/Berlin", tz)
		} else {
			loc = l
		}
	}
	if len(exprs) == 0 {
		b.errorf(key+"."+periodsKey, "needs at least one period")
	}
	var out []schedule.Period
	for j, expr := range exprs {
		pk := fmt.Sprintf("%s.%s[%d]", key, periodsKey, j)
		p, err := schedule.ParsePeriod(expr, loc)
		if err != nil {
			b.errorf(pk, "%v", err)
			continue
		}
		if style == schedule.DockerMachine && p.Fields() == 5 {
			b.warnf(pk, "gitlab-runner matches a 5-field period only at second 0 of each minute; mayfly matches the whole minute")
		}
		out = append(out, p)
	}
	return out
}

// provider maps a driver or plugin name to a mayfly provider plugin name.
func provider(name string) string {
	base := name
	if i := strings.LastIndex(base, "/"); i >= 0 {
		base = base[i+1:]
	}
	base, _, _ = strings.Cut(base, ":") // drop an OCI tag
	if p, ok := providerAliases[base]; ok {
		return p
	}
	return strings.TrimPrefix(base, "mayfly-plugin-")
}
