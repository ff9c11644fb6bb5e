package config

import (
	"fmt"
	"time"
)

// The types in this file mirror config.toml as gitlab-runner writes it. They
// are decoded strictly; Build turns them into the validated model. Pointers
// mark values whose absence differs from zero.

type fileConfig struct {
	Concurrent      *int         `toml:"concurrent"`
	CheckInterval   *int         `toml:"check_interval"`
	ListenAddress   string       `toml:"listen_address"`
	LogLevel        string       `toml:"log_level"`
	LogFormat       string       `toml:"log_format"`
	ShutdownTimeout *int         `toml:"shutdown_timeout"`
	Runners         []fileRunner `toml:"runners"`
}

type fileRunner struct {
	Name               string          `toml:"name"`
	URL                string          `toml:"url"`
	Token              string          `toml:"token"`
	Limit              *int            `toml:"limit"`
	RequestConcurrency *int            `toml:"request_concurrency"`
	OutputLimit        *int            `toml:"output_limit"`
	Executor           string          `toml:"executor"`
	Shell              string          `toml:"shell"`
	BuildsDir          string          `toml:"builds_dir"`
	Environment        []string        `toml:"environment"`
	PreCloneScript     string          `toml:"pre_clone_script"`
	PreGetSources      string          `toml:"pre_get_sources_script"`
	PostCloneScript    string          `toml:"post_clone_script"`
	PostGetSources     string          `toml:"post_get_sources_script"`
	PreBuildScript     string          `toml:"pre_build_script"`
	PostBuildScript    string          `toml:"post_build_script"`
	MaxJobTimeout      *int            `toml:"max_job_timeout"`
	Machine            *fileMachine    `toml:"machine"`
	Autoscaler         *fileAutoscaler `toml:"autoscaler"`
	Docker             *fileDocker     `toml:"docker"`
	Cache              *fileCache      `toml:"cache"`
}

type fileMachine struct {
	IdleCount              *int                     `toml:"IdleCount"`
	IdleCountMin           *int                     `toml:"IdleCountMin"`
	IdleScaleFactor        *float64                 `toml:"IdleScaleFactor"`
	IdleTime               *int                     `toml:"IdleTime"`
	IdlePredictive         *bool                    `toml:"IdlePredictive"`
	IdlePredictiveQuantile *float64                 `toml:"IdlePredictiveQuantile"`
	IdlePredictiveWithin   *int                     `toml:"IdlePredictiveWithin"`
	MaxGrowthRate          *int                     `toml:"MaxGrowthRate"`
	OnDemandWithin         *int                     `toml:"OnDemandWithin"`
	MaxBuilds              *int                     `toml:"MaxBuilds"`
	MachineName            string                   `toml:"MachineName"`
	MachineDriver          string                   `toml:"MachineDriver"`
	MachineOptions         []string                 `toml:"MachineOptions"`
	Autoscaling            []fileMachineAutoscaling `toml:"autoscaling"`
}

type fileMachineAutoscaling struct {
	Periods                []string `toml:"Periods"`
	Timezone               string   `toml:"Timezone"`
	IdleCount              *int     `toml:"IdleCount"`
	IdleCountMin           *int     `toml:"IdleCountMin"`
	IdleScaleFactor        *float64 `toml:"IdleScaleFactor"`
	IdleTime               *int     `toml:"IdleTime"`
	IdlePredictive         *bool    `toml:"IdlePredictive"`
	IdlePredictiveQuantile *float64 `toml:"IdlePredictiveQuantile"`
	IdlePredictiveWithin   *int     `toml:"IdlePredictiveWithin"`
}

type fileAutoscaler struct {
	Plugin                    string         `toml:"plugin"`
	PluginConfig              map[string]any `toml:"plugin_config"`
	ConnectorConfig           fileConnector  `toml:"connector_config"`
	CapacityPerInstance       *int           `toml:"capacity_per_instance"`
	MaxUseCount               *int           `toml:"max_use_count"`
	MaxInstances              *int           `toml:"max_instances"`
	MaxGrowthRate             *int           `toml:"max_growth_rate"`
	OnDemandWithin            *duration      `toml:"on_demand_within"`
	UpdateInterval            *duration      `toml:"update_interval"`
	UpdateIntervalExpecting   *duration      `toml:"update_interval_when_expecting"`
	InstanceReadyCommand      string         `toml:"instance_ready_command"`
	DeleteInstancesOnShutdown bool           `toml:"delete_instances_on_shutdown"`
	Policy                    []filePolicy   `toml:"policy"`
}

type fileConnector struct {
	OS                   string    `toml:"os"`
	Arch                 string    `toml:"arch"`
	Protocol             string    `toml:"protocol"`
	Username             string    `toml:"username"`
	Password             string    `toml:"password"`
	KeyPath              string    `toml:"key_path"`
	UseStaticCredentials bool      `toml:"use_static_credentials"`
	Timeout              *duration `toml:"timeout"`
	UseExternalAddr      bool      `toml:"use_external_addr"`
}

type filePolicy struct {
	Periods            []string  `toml:"periods"`
	Timezone           string    `toml:"timezone"`
	IdleCount          *int      `toml:"idle_count"`
	IdleTime           *duration `toml:"idle_time"`
	ScaleFactor        *float64  `toml:"scale_factor"`
	ScaleFactorLimit   *int      `toml:"scale_factor_limit"`
	PreemptiveMode     *bool     `toml:"preemptive_mode"`
	Predictive         *bool     `toml:"predictive"`
	PredictiveQuantile *float64  `toml:"predictive_quantile"`
	PredictiveWithin   *duration `toml:"predictive_within"`
}

// duration is a Go duration written as a TOML string ("20m", "1h30m"), the
// form gitlab-runner's [runners.autoscaler] settings use.
type duration time.Duration

// UnmarshalText parses a Go duration string.
func (d *duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("want a duration such as \"30s\" or \"20m\": %w", err)
	}
	*d = duration(v)
	return nil
}

// ignoredKeys are keys gitlab-runner accepts that mayfly reads past with a
// warning, each with the reason. A key path here covers everything below it.
// Paths use "runners" for every [[runners]] entry.
var ignoredKeys = map[string]string{
	"session_server":                                "mayfly has no interactive web terminal",
	"sentry_dsn":                                    "mayfly does not report to Sentry",
	"connection_max_age":                            "mayfly manages its own HTTP connections",
	"runners.id":                                    "informational only",
	"runners.token_obtained_at":                     "informational only",
	"runners.token_expires_at":                      "informational only",
	"runners.tls-ca-file":                           "custom CA files are not supported yet",
	"runners.tls-cert-file":                         "client certificates are not supported yet",
	"runners.tls-key-file":                          "client certificates are not supported yet",
	"runners.clone_url":                             "jobs clone from the URL GitLab sends",
	"runners.cache_dir":                             "each VM lives for one job; there is no local cache",
	"runners.debug_trace_disabled":                  "not supported yet",
	"runners.unhealthy_requests_limit":              "mayfly backs off instead of disabling a runner",
	"runners.unhealthy_interval":                    "mayfly backs off instead of disabling a runner",
	"runners.post_clone_script":                     "not supported yet",
	"runners.post_get_sources_script":               "not supported yet",
	"runners.kubernetes":                            "mayfly runs jobs in VMs, not pods",
	"runners.custom":                                "mayfly runs jobs itself; custom executor scripts are not used",
	"runners.custom_build_dir":                      "builds run in builds_dir inside a fresh VM",
	"runners.ssh":                                   "connections come from the provider and [runners.autoscaler.connector_config]",
	"runners.parallels":                             "not a mayfly provider",
	"runners.virtualbox":                            "not a mayfly provider",
	"runners.feature_flags":                         "gitlab-runner feature flags do not apply",
	"runners.referees":                              "not supported",
	"runners.machine.OffPeakPeriods":                "removed in gitlab-runner 14.0; use [[runners.machine.autoscaling]]",
	"runners.machine.OffPeakTimezone":               "removed in gitlab-runner 14.0; use [[runners.machine.autoscaling]]",
	"runners.machine.OffPeakIdleCount":              "removed in gitlab-runner 14.0; use [[runners.machine.autoscaling]]",
	"runners.machine.OffPeakIdleTime":               "removed in gitlab-runner 14.0; use [[runners.machine.autoscaling]]",
	"runners.machine.MaxRemovalAttempts":            "mayfly retries deletion until the provider confirms it",
	"runners.autoscaler.deletion_retry_interval":    "mayfly retries deletion with backoff",
	"runners.autoscaler.shutdown_deletion_interval": "mayfly retries deletion with backoff",
	"runners.autoscaler.shutdown_deletion_retries":  "mayfly retries deletion with backoff",
	"runners.autoscaler.failure_threshold":          "mayfly replaces an instance at its first failed health check",
	"runners.autoscaler.instance_acquire_timeout":   "mayfly asks for a job only when a VM is ready",
	"runners.autoscaler.log_internal_ip":            "not supported",
	"runners.autoscaler.log_external_ip":            "not supported",
	"runners.autoscaler.state_storage":              "mayfly derives state from provider labels",
	"runners.autoscaler.scale_throttle":             "use max_growth_rate",
	"runners.autoscaler.vm_isolation":               "every mayfly VM already runs one job",
	"runners.autoscaler.reservation_throttling":     "mayfly reserves only ready VMs",
	"runners.autoscaler.connector_config.keepalive": "mayfly sets its own SSH keepalive",
}
