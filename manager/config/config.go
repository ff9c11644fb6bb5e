// Package config loads mayfly's configuration: a gitlab-runner config.toml,
// read as users already have it, with docker+machine ([runners.machine]) or
// taskscaler-style ([runners.autoscaler]) autoscaling. Both blocks become one
// fleet model whose idle policy is a schedule.Schedule.
//
// Errors name the file, line, column and key. Keys gitlab-runner accepts but
// mayfly does not use are reported as warnings, not errors.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/schedule"
)

// Defaults, as in gitlab-runner where it has one.
const (
	DefaultConcurrent         = 1
	DefaultCheckInterval      = 3 * time.Second
	DefaultShutdownTimeout    = 30 * time.Second
	DefaultRequestConcurrency = 1
	DefaultOutputLimitKB      = 4096
	// DefaultMaxJobTimeout is the hard cap on a job's run time, as on GitLab's hosted runners.
	DefaultMaxJobTimeout = 3 * time.Hour
	// DefaultConnectTimeout bounds waiting for a new VM to accept SSH or WinRM.
	DefaultConnectTimeout = 10 * time.Minute
	// DefaultOnDemandWithin turns on taking jobs on demand: when no VM is
	// idle a job is taken and a VM created for it (see fleet.Reservable);
	// when no VM may be created, only for one expected within this window.
	// It leaves room under the 120 s queue-to-start SLO of hosted runners.
	DefaultOnDemandWithin = 90 * time.Second
)

// Config is a loaded and validated configuration.
type Config struct {
	Path            string // the file it was read from
	Concurrent      int
	CheckInterval   time.Duration
	ListenAddress   string // where metrics are served; empty = not served
	LogLevel        string
	LogFormat       string
	ShutdownTimeout time.Duration
	Runners         []Runner
	Warnings        []Warning // accepted but ignored settings and deliberate differences
}

// Runner is one [[runners]] entry.
type Runner struct {
	Name               string
	URL                string
	Token              string
	Limit              int // jobs at once on this runner; 0 = no limit but Concurrent
	RequestConcurrency int
	OutputLimitKB      int
	Executor           string
	Shell              string
	BuildsDir          string
	Environment        []string
	PreCloneScript     string // pre_get_sources_script
	PostCloneScript    string // post_get_sources_script
	PreBuildScript     string
	PostBuildScript    string
	MaxJobTimeout      time.Duration // hard cap over the job's own timeout
	Fleet              Fleet
	// Docker is set when jobs with an image run in containers on their VM
	// (docker+machine and docker-autoscaler on Linux VMs); nil otherwise.
	Docker *Docker
	// Cache is [runners.cache], the distributed cache; nil without one.
	Cache *Cache
}

// Fleet is how a runner's VMs are made, used and kept idle.
type Fleet struct {
	Block           string            // "runners.machine" or "runners.autoscaler"
	Provider        string            // plugin name
	ProviderOptions map[string]string // MachineOptions as key=value
	ProviderConfig  map[string]any    // [runners.autoscaler.plugin_config]
	NameTemplate    string            // instance name with %s, for docker+machine
	// Limits are the fleet's bounds and cadences: MaxBuilds or
	// max_use_count, MaxGrowthRate, limit or max_instances,
	// OnDemandWithin, update_interval and update_interval_when_expecting,
	// the connector's timeout as BootTimeout and the global check_interval.
	fleet.Limits
	InstanceReadyCommand string
	DeleteOnShutdown     bool
	Connector            Connector
	Schedule             schedule.Schedule
}

// Connector is how the manager reaches an instance.
type Connector struct {
	OS                   string // linux | windows
	Arch                 string
	Protocol             string // ssh | winrm
	Username             string
	Password             string
	KeyPath              string
	UseStaticCredentials bool
	Timeout              time.Duration
	UseExternalAddr      bool
}

// Warning is a setting that was accepted but is ignored or read differently
// from gitlab-runner.
type Warning struct {
	File         string
	Line, Column int
	Key          string
	Message      string
}

func (w Warning) String() string {
	return fmt.Sprintf("%s: %s: %s", place(w.File, w.Line, w.Column), w.Key, w.Message)
}

// Error is one problem in a config file.
type Error struct {
	File         string
	Line, Column int // 0 when unknown
	Key          string
	Message      string
}

func (e *Error) Error() string {
	if e.Key == "" {
		return fmt.Sprintf("%s: %s", place(e.File, e.Line, e.Column), e.Message)
	}
	return fmt.Sprintf("%s: %s: %s", place(e.File, e.Line, e.Column), e.Key, e.Message)
}

// ErrorList is every problem found in a config file, in file order.
type ErrorList []*Error

func (l ErrorList) Error() string {
	msgs := make([]string, len(l))
	for i, e := range l {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// Unwrap lets errors.As find each *Error.
func (l ErrorList) Unwrap() []error {
	out := make([]error, len(l))
	for i, e := range l {
		out[i] = e
	}
	return out
}

func place(file string, line, col int) string {
	switch {
	case line > 0 && col > 0:
		return fmt.Sprintf("%s:%d:%d", file, line, col)
	case line > 0:
		return fmt.Sprintf("%s:%d", file, line)
	}
	return file
}

// Load reads and validates the config file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Parse validates a config document; name is used in errors.
func Parse(name string, data []byte) (*Config, error) {
	var raw fileConfig
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(&raw)
	pos := indexPositions(data)
	b := &builder{file: name, pos: pos}
	var strict *toml.StrictMissingError
	var derr *toml.DecodeError
	switch {
	case errors.As(err, &strict):
		// Known gitlab-runner keys become warnings; the rest are errors.
		// Decoding went on past them, so raw is complete.
		for i := range strict.Errors {
			b.unknownKey(&strict.Errors[i])
		}
	case errors.As(err, &derr):
		line, col := derr.Position()
		return nil, ErrorList{{File: name, Line: line, Column: col, Key: strings.Join(derr.Key(), "."), Message: decodeMessage(derr)}}
	case err != nil:
		return nil, ErrorList{{File: name, Message: err.Error()}}
	}
	cfg := b.build(&raw)
	if len(b.errs) > 0 {
		sort.SliceStable(b.errs, func(i, j int) bool { return b.errs[i].Line < b.errs[j].Line })
		return nil, b.errs
	}
	sort.SliceStable(b.warnings, func(i, j int) bool { return b.warnings[i].Line < b.warnings[j].Line })
	cfg.Path = name
	cfg.Warnings = b.warnings
	return cfg, nil
}

// decodeMessage rewords go-toml's type errors in the config's own terms.
func decodeMessage(e *toml.DecodeError) string {
	msg := strings.TrimPrefix(e.Error(), "toml: ")
	// "cannot decode TOML string into struct field config.fileMachine.IdleCount of type int"
	if i := strings.Index(msg, " into struct field "); i >= 0 {
		rest := msg[i+len(" into struct field "):]
		if j := strings.Index(rest, " of type "); j >= 0 {
			msg = fmt.Sprintf("wrong type: %s where %s expected", strings.TrimPrefix(msg[:i], "cannot decode "), typeName(rest[j+len(" of type "):]))
		}
	}
	return msg
}

func typeName(goType string) string {
	switch strings.TrimPrefix(goType, "*") {
	case "int":
		return "an integer"
	case "float64":
		return "a number"
	case "bool":
		return "true or false"
	case "string", "config.duration":
		return "a string"
	case "[]string":
		return "an array of strings"
	}
	if strings.HasPrefix(goType, "[]") {
		return "an array of tables"
	}
	if strings.HasPrefix(goType, "config.") || strings.HasPrefix(goType, "map[") {
		return "a table"
	}
	return goType
}
