package gce

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/mayfly-ci/mayfly/providers"
)

// machineOption translates one docker-machine google driver option
// (MachineOptions of a docker+machine config, given as strings) into a
// plugin setting.
type machineOption struct {
	key     string
	convert func(string) (any, error)
}

func asString(v string) (any, error) { return v, nil }

func asBool(v string) (any, error) { return strconv.ParseBool(v) }

func asNegatedBool(v string) (any, error) {
	b, err := strconv.ParseBool(v)
	return !b, err
}

func asInt(v string) (any, error) { return strconv.ParseInt(v, 10, 64) }

func asList(v string) (any, error) {
	var out []string
	for s := range strings.SplitSeq(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out, nil
}

// asImage accepts the image forms docker-machine does: a full API URL,
// "projects/P/global/images/I" or "P/global/images/I".
func asImage(v string) (any, error) {
	if _, rest, ok := strings.Cut(v, "/compute/v1/"); ok && strings.HasPrefix(v, "http") {
		v = rest
	}
	if !strings.HasPrefix(v, "projects/") && strings.Contains(v, "/global/images/") {
		v = "projects/" + v
	}
	return v, nil
}

var machineOptions = map[string]machineOption{
	"google-project":              {"project", asString},
	"google-zone":                 {"zones", func(v string) (any, error) { return []string{v}, nil }},
	"google-machine-type":         {"machine_type", asString},
	"google-machine-image":        {"image", asImage},
	"google-disk-size":            {"disk_size_gb", asInt},
	"google-disk-type":            {"disk_type", asString},
	"google-network":              {"network", asString},
	"google-subnetwork":           {"subnetwork", asString},
	"google-tags":                 {"network_tags", asList},
	"google-preemptible":          {"preemptible", asBool},
	"google-use-internal-ip":      {"use_external_ip", asNegatedBool},
	"google-use-internal-ip-only": {"external_ip", asNegatedBool},
	"google-username":             {"username", asString},
	"google-service-account":      {"service_account", asString},
	"google-scopes":               {"service_account_scopes", asList},
}

// fromMachineOptions rewrites settings that hold docker-machine google
// driver options ("google-zone": "us-east1-c", as mayfly passes the
// MachineOptions of a [runners.machine] block) into the plugin's own keys.
// Docker engine options (engine-*) are ignored with a warning: mayfly runs
// no Docker engine on the VM. Other google-* options are errors naming
// the option. Settings without such keys are returned unchanged.
func fromMachineOptions(raw json.RawMessage, log *slog.Logger) (json.RawMessage, error) {
	trimmed := bytes.TrimSpace(raw)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return raw, nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(trimmed, &obj); err != nil {
		return raw, nil // DecodeSettings reports it
	}
	found := false
	for k := range obj {
		if strings.HasPrefix(k, "google-") || strings.HasPrefix(k, "engine-") {
			found = true
		}
	}
	if !found {
		return raw, nil
	}
	out := map[string]json.RawMessage{}
	from := map[string]string{}
	for _, k := range slices.Sorted(maps.Keys(obj)) {
		v := obj[k]
		switch {
		case strings.HasPrefix(k, "engine-"):
			log.Warn("ignoring docker-machine engine option: mayfly runs no Docker engine on the instance", "option", k)
			continue
		case !strings.HasPrefix(k, "google-"):
			if prev, dup := from[k]; dup {
				return nil, providers.InvalidArgument(fmt.Errorf("settings key %q: also set by docker-machine option %q", k, prev))
			}
			out[k], from[k] = v, k
			continue
		}
		opt, ok := machineOptions[k]
		if !ok {
			return nil, providers.InvalidArgument(fmt.Errorf("settings key %q: docker-machine option not supported by the gce plugin", k))
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, providers.InvalidArgument(fmt.Errorf("settings key %q: docker-machine options are strings: %w", k, err))
		}
		val, err := opt.convert(s)
		if err != nil {
			return nil, providers.InvalidArgument(fmt.Errorf("settings key %q: %q: %w", k, s, err))
		}
		b, err := json.Marshal(val)
		if err != nil {
			return nil, providers.InvalidArgument(fmt.Errorf("settings key %q: %w", k, err))
		}
		if prev, dup := from[opt.key]; dup {
			return nil, providers.InvalidArgument(fmt.Errorf("settings key %q: %s is also set by %q", k, opt.key, prev))
		}
		out[opt.key], from[opt.key] = b, k
	}
	b, err := json.Marshal(out)
	if err != nil {
		return nil, providers.InvalidArgument(fmt.Errorf("settings: %w", err))
	}
	return b, nil
}
