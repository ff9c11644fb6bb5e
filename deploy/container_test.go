package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
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
