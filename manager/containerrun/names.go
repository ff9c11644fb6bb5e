package containerrun

import (
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// Names of the Docker objects of a job. They are derived from the job id
// (and the stage ID), so that a restarted manager finds them again.
func networkName(job int64) string { return fmt.Sprintf("mayfly-job%d", job) }
func stageContainer(job int64, stageID string) string {
	return fmt.Sprintf("mayfly-job%d-%s", job, stageID)
}
func serviceContainer(job int64, i int) string { return fmt.Sprintf("mayfly-job%d-service%d", job, i) }
func recordVolume(job int64) string            { return fmt.Sprintf("mayfly-job%d-prepare", job) }
func jobVolume(job int64, i int) string        { return fmt.Sprintf("mayfly-job%d-volume%d", job, i) }

// Labels on every object of a job.
const (
	labelJob  = "com.mayfly-ci.job"
	labelKind = "com.mayfly-ci.kind"
)

// referenceRE splits an image reference into name, tag and digest (the
// reference grammar's outline: a tag follows the last slash).
var referenceRE = regexp.MustCompile(`^([^@]+?)(?::([\w][\w.-]{0,127}))?(?:@(sha256:[0-9a-f]{64}))?$`)

// serviceAliases returns the network aliases of a service as gitlab-runner
// derives them from its image name: the name without tag, digest and
// registry port, with "/" replaced by "__", and by "-" (RFC 1123), then
// the service's own alias: entries (commas or spaces between them).
func serviceAliases(svc runnerapi.Image) []string {
	var out []string
	add := func(a string) {
		if a != "" && !contains(out, a) {
			out = append(out, a)
		}
	}
	name := svc.Name
	if m := referenceRE.FindStringSubmatch(name); m != nil {
		name = m[1]
	}
	// The registry's port does not belong in a host name.
	if first, rest, ok := strings.Cut(name, "/"); ok && strings.ContainsAny(first, ".:") {
		host, _, _ := strings.Cut(first, ":")
		name = host + "/" + rest
	}
	add(strings.ReplaceAll(name, "/", "__"))
	add(strings.ReplaceAll(name, "/", "-"))
	for _, a := range strings.Fields(strings.ReplaceAll(svc.Alias, ",", " ")) {
		add(a)
	}
	return out
}

// registryHost returns the registry part of an image reference, or "" for
// Docker Hub (no dot, colon or "localhost" before the first slash).
func registryHost(ref string) string {
	first, _, ok := strings.Cut(ref, "/")
	if !ok || !(strings.ContainsAny(first, ".:") || first == "localhost") {
		return ""
	}
	return first
}

// withTag adds :latest to a reference without tag or digest, as docker
// pull does.
func withTag(ref string) string {
	m := referenceRE.FindStringSubmatch(ref)
	if m == nil || m[2] != "" || m[3] != "" {
		return ref
	}
	return ref + ":latest"
}

// expander expands $VAR and ${VAR} in image names and aliases with the
// job's variables (the last definition wins), as gitlab-runner does.
func expander(vars []runnerapi.Variable) func(string) string {
	m := map[string]string{}
	for _, v := range vars {
		m[v.Key] = v.Value
	}
	return func(s string) string {
		return os.Expand(s, func(k string) string { return m[k] })
	}
}

func contains(list []string, s string) bool {
	for _, e := range list {
		if e == s {
			return true
		}
	}
	return false
}
