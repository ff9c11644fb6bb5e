package gitlabci

import (
	"fmt"
	"slices"
	"strings"
)

// ignoredJobKeys are GitLab keywords a job may use that the coordinator
// does not implement: the job runs without them, with one warning each.
var ignoredJobKeys = map[string]string{
	"environment":         "environments are not tracked",
	"coverage":            "coverage is not parsed from the log",
	"interruptible":       "pipelines are never auto-canceled",
	"resource_group":      "jobs are not serialized by resource group",
	"release":             "releases are not created",
	"pages":               "Pages are not published",
	"secrets":             "external secrets are not fetched",
	"id_tokens":           "ID tokens are not issued",
	"identity":            "identity federation is not available",
	"dast_configuration":  "DAST profiles are not available",
	"manual_confirmation": "manual jobs are never run",
	"start_in":            "delayed jobs start at once",
}

// skippedJobKeys make a job that the coordinator cannot run at all.
var skippedJobKeys = map[string]string{
	"trigger": "downstream pipelines are not supported",
	"run":     "CI/CD steps (run:) are not supported",
}

var jobKeys = []string{"stage", "image", "services", "variables", "before_script", "script",
	"after_script", "needs", "dependencies", "artifacts", "cache", "tags", "timeout",
	"allow_failure", "when", "retry", "parallel", "rules", "only", "except", "inherit", "hooks", "extends"}

// job decodes one (extended) job. It returns nil without error for a job
// the coordinator skips (trigger:, run:), with a warning.
func (p *parser) job(name string, key, n, defaults *node, cfg *Config) (*Job, error) {
	j := &Job{Name: name, File: key.file, Line: key.line, Stage: "test", When: "on_success"}
	if len(name) > 255 {
		return nil, p.errorf(key, "", "job name is longer than 255 characters")
	}
	for _, k := range n.keys {
		if why, ok := skippedJobKeys[k.value]; ok {
			p.warn(k, name+": "+k.value, "%s by mayfly's coordinator; job skipped", why)
			return nil, nil
		}
	}
	inheritDefault := func(string) bool { return true }
	if in := n.get("inherit"); in != nil {
		var err error
		if inheritDefault, err = p.inherit(in, name, j); err != nil {
			return nil, err
		}
	}
	// default: fills the keys the job does not set itself.
	full := n.without()
	for i, k := range defaults.keys {
		if !full.has(k.value) && inheritDefault(k.value) {
			full.setKey(k, defaults.vals[i])
		}
	}
	allowFailureSet := false
	for i, k := range full.keys {
		v, kp := full.vals[i], name+": "+k.value
		if why, ok := ignoredJobKeys[k.value]; ok {
			p.warn(k, kp, "not supported by mayfly's coordinator (%s); ignored", why)
			continue
		}
		if !slices.Contains(jobKeys, k.value) {
			return nil, p.errorf(k, name, "unknown keyword %q", k.value)
		}
		var err error
		switch k.value {
		case "stage":
			j.Stage, err = p.str(v, kp)
		case "image":
			j.Image, err = p.image(v, kp, false)
		case "services":
			j.Services, err = p.services(v, kp)
		case "variables":
			j.Variables, err = p.variables(v, kp)
		case "before_script":
			j.BeforeScript, err = p.script(v, kp)
		case "script":
			j.Script, err = p.script(v, kp)
		case "after_script":
			j.AfterScript, err = p.script(v, kp)
		case "hooks":
			err = p.hooks(v, kp, j)
		case "needs":
			j.Needs, err = p.needs(v, kp)
		case "dependencies":
			var deps []string
			if v.kind != kindNull {
				deps, err = p.list(v, kp)
			}
			j.Dependencies = &deps
		case "artifacts":
			j.Artifacts, err = p.artifacts(v, kp)
		case "cache":
			j.Cache, err = p.caches(v, kp)
		case "tags":
			j.Tags, err = p.list(v, kp)
		case "timeout":
			var s string
			if s, err = p.str(v, kp); err == nil {
				if j.Timeout, err = ParseDuration(s); err != nil {
					err = p.errorf(v, kp, "%v", err)
				}
			}
		case "allow_failure":
			allowFailureSet = true
			err = p.allowFailure(v, kp, j)
		case "when":
			j.When, err = p.oneOf(v, kp, "on_success", "on_failure", "always", "manual", "delayed")
			if j.When == "delayed" {
				p.warn(v, kp, "delayed jobs are not supported by mayfly's coordinator; it starts as on_success")
				j.When = "on_success"
			}
		case "retry":
			j.Retry, err = p.retry(v, kp)
		case "parallel":
			err = p.parallel(v, kp, j)
		case "rules":
			j.Rules, err = p.rules(v, kp)
		case "only":
			j.Only, err = p.refFilter(v, kp)
		case "except":
			j.Except, err = p.refFilter(v, kp)
		}
		if err != nil {
			return nil, err
		}
	}
	if !slices.Contains(cfg.Stages, j.Stage) {
		return nil, p.errorf(full.get("stage"), name+": stage", "%q is not one of the stages %v", j.Stage, cfg.Stages)
	}
	if len(j.Script) == 0 {
		return nil, p.errorf(key, name, "a job needs a script: with at least one line")
	}
	if j.When == "manual" && !allowFailureSet {
		j.AllowFailure = true // GitLab's default for manual jobs
	}
	if j.Rules != nil && (j.Only != nil || j.Except != nil) {
		return nil, p.errorf(key, name, "rules: cannot be used with only: or except:")
	}
	return j, nil
}

// inherit reads inherit: and returns which default: keys the job takes.
func (p *parser) inherit(n *node, name string, j *Job) (func(string) bool, error) {
	h, err := p.hash(n, name+": inherit")
	if err != nil {
		return nil, err
	}
	takeDefault := func(string) bool { return true }
	for i, k := range h.keys {
		v, kp := h.vals[i], name+": inherit: "+k.value
		switch k.value {
		case "default", "variables":
			var all bool
			var list []string
			if v.kind == kindScalar {
				if all, err = p.boolean(v, kp); err != nil {
					return nil, err
				}
			} else if list, err = p.list(v, kp); err != nil {
				return nil, err
			}
			if k.value == "default" {
				if !all {
					takeDefault = func(key string) bool { return slices.Contains(list, key) }
				}
				continue
			}
			switch {
			case all:
			case list == nil:
				j.inheritNoVars = true
			default:
				j.InheritVariables = list
			}
		default:
			return nil, p.errorf(k, name+": inherit", "unknown key %q (default, variables)", k.value)
		}
	}
	return takeDefault, nil
}

// image reads image: (a name or a hash); service adds alias, command, variables.
func (p *parser) image(n *node, key string, service bool) (*Image, error) {
	if n.kind == kindScalar {
		if n.value == "" {
			return nil, p.errorf(n, key, "an image name cannot be empty")
		}
		return &Image{Name: n.value}, nil
	}
	h, err := p.hash(n, key)
	if err != nil {
		return nil, fmt.Errorf("%w (an image name or a hash with name:)", err)
	}
	img := &Image{}
	for i, k := range h.keys {
		v, kp := h.vals[i], key+": "+k.value
		switch k.value {
		case "name":
			img.Name, err = p.str(v, kp)
		case "entrypoint":
			img.Entrypoint, err = p.list(v, kp)
		case "pull_policy":
			img.PullPolicy, err = p.strList(v, kp)
			for _, pp := range img.PullPolicy {
				if pp != "always" && pp != "if-not-present" && pp != "never" {
					err = p.errorf(v, kp, "%q is not always, if-not-present or never", pp)
				}
			}
		case "alias", "command", "variables":
			if !service {
				return nil, p.errorf(k, key, "%s: is for services, not image:", k.value)
			}
			switch k.value {
			case "alias":
				img.Alias, err = p.str(v, kp)
			case "command":
				img.Command, err = p.list(v, kp)
			case "variables":
				img.Variables, err = p.variables(v, kp)
			}
		case "docker", "kubernetes", "ports":
			p.warn(k, kp, "not supported by mayfly's coordinator; ignored")
		default:
			return nil, p.errorf(k, key, "unknown key %q", k.value)
		}
		if err != nil {
			return nil, err
		}
	}
	if img.Name == "" {
		return nil, p.errorf(n, key, "name: is required")
	}
	return img, nil
}

func (p *parser) services(n *node, key string) ([]Image, error) {
	if n.kind != kindSeq {
		return nil, p.errorf(n, key, "should be a list of images")
	}
	out := []Image{}
	for i, it := range n.items {
		img, err := p.image(it, fmt.Sprintf("%s[%d]", key, i), true)
		if err != nil {
			return nil, err
		}
		out = append(out, *img)
	}
	return out, nil
}

func (p *parser) hooks(n *node, key string, j *Job) error {
	h, err := p.hash(n, key)
	if err != nil {
		return err
	}
	for i, k := range h.keys {
		if k.value != "pre_get_sources_script" {
			p.warn(k, key+": "+k.value, "not supported by mayfly's coordinator; ignored")
			continue
		}
		if j.PreGetSourcesScript, err = p.script(h.vals[i], key+": "+k.value); err != nil {
			return err
		}
	}
	return nil
}

func (p *parser) needs(n *node, key string) (*[]Need, error) {
	out := []Need{}
	if n.kind == kindNull {
		return &out, nil
	}
	if n.kind != kindSeq {
		return nil, p.errorf(n, key, "should be a list of job names or hashes with job:")
	}
	for i, it := range n.items {
		kp := fmt.Sprintf("%s[%d]", key, i)
		if it.kind == kindScalar {
			out = append(out, Need{Job: it.value})
			continue
		}
		h, err := p.hash(it, kp)
		if err != nil {
			return nil, err
		}
		var nd Need
		skip := false
		for j, k := range h.keys {
			v := h.vals[j]
			switch k.value {
			case "job":
				nd.Job, err = p.str(v, kp+": job")
			case "artifacts":
				var a bool
				a, err = p.boolean(v, kp+": artifacts")
				nd.NoArtifacts = !a
			case "optional":
				nd.Optional, err = p.boolean(v, kp+": optional")
			case "project", "pipeline", "ref", "parallel":
				p.warn(k, kp+": "+k.value, "needs from other pipelines or matrix selection are not supported by mayfly's coordinator; this need is ignored")
				skip = true
			default:
				return nil, p.errorf(k, kp, "unknown key %q", k.value)
			}
			if err != nil {
				return nil, err
			}
		}
		if skip {
			continue
		}
		if nd.Job == "" {
			return nil, p.errorf(it, kp, "job: is required")
		}
		out = append(out, nd)
	}
	return &out, nil
}

// reportTypes are the artifacts:reports types GitLab knows.
var reportTypes = []string{"junit", "dotenv", "codequality", "sast", "secret_detection",
	"dependency_scanning", "container_scanning", "cluster_image_scanning", "dast",
	"license_scanning", "performance", "browser_performance", "load_performance", "metrics",
	"lsif", "terraform", "requirements", "requirements_v2", "coverage_fuzzing", "api_fuzzing",
	"cyclonedx", "annotations", "accessibility", "repository_xray", "sarif", "scip"}

func (p *parser) artifacts(n *node, key string) (*Artifacts, error) {
	h, err := p.hash(n, key)
	if err != nil {
		return nil, err
	}
	a := &Artifacts{}
	for i, k := range h.keys {
		v, kp := h.vals[i], key+": "+k.value
		switch k.value {
		case "name":
			a.Name, err = p.str(v, kp)
		case "paths":
			a.Paths, err = p.list(v, kp)
		case "exclude":
			a.Exclude, err = p.list(v, kp)
		case "untracked":
			a.Untracked, err = p.boolean(v, kp)
		case "when":
			a.When, err = p.oneOf(v, kp, "on_success", "on_failure", "always")
		case "expire_in":
			a.ExpireIn, err = p.str(v, kp)
		case "reports":
			a.Reports, err = p.reports(v, kp)
		case "expose_as", "public", "access":
			p.warn(k, kp, "not supported by mayfly's coordinator; ignored")
		default:
			return nil, p.errorf(k, key, "unknown key %q", k.value)
		}
		if err != nil {
			return nil, err
		}
	}
	return a, nil
}

func (p *parser) reports(n *node, key string) ([]Report, error) {
	h, err := p.hash(n, key)
	if err != nil {
		return nil, err
	}
	var out []Report
	for i, k := range h.keys {
		v, kp := h.vals[i], key+": "+k.value
		switch {
		case k.value == "coverage_report":
			c, err := p.hash(v, kp)
			if err != nil {
				return nil, err
			}
			format, err := p.oneOf(c.get("coverage_format"), kp+": coverage_format", "cobertura", "jacoco")
			if err != nil {
				return nil, err
			}
			pth, err := p.str(c.get("path"), kp+": path")
			if err != nil {
				return nil, err
			}
			out = append(out, Report{Type: format, Paths: []string{pth}})
		case slices.Contains(reportTypes, k.value):
			paths, err := p.strList(v, kp)
			if err != nil {
				return nil, err
			}
			out = append(out, Report{Type: k.value, Paths: paths})
		default:
			return nil, p.errorf(k, key, "unknown report type %q", k.value)
		}
	}
	return out, nil
}

// caches reads cache: (one hash or a list of at most 4).
func (p *parser) caches(n *node, key string) ([]Cache, error) {
	items := []*node{n}
	if n.kind == kindSeq {
		items = n.items
		if len(items) > 4 {
			return nil, p.errorf(n, key, "at most 4 caches per job, got %d", len(items))
		}
	}
	out := []Cache{}
	for i, it := range items {
		kp := key
		if n.kind == kindSeq {
			kp = fmt.Sprintf("%s[%d]", key, i)
		}
		h, err := p.hash(it, kp)
		if err != nil {
			return nil, err
		}
		var c Cache
		for j, k := range h.keys {
			v, kk := h.vals[j], kp+": "+k.value
			switch k.value {
			case "key":
				err = p.cacheKey(v, kk, &c)
			case "paths":
				c.Paths, err = p.list(v, kk)
			case "untracked":
				c.Untracked, err = p.boolean(v, kk)
			case "policy":
				c.Policy, err = p.oneOf(v, kk, "pull-push", "pull", "push")
			case "when":
				c.When, err = p.oneOf(v, kk, "on_success", "on_failure", "always")
			case "unprotect":
				c.Unprotect, err = p.boolean(v, kk)
			case "fallback_keys":
				c.FallbackKeys, err = p.list(v, kk)
			default:
				return nil, p.errorf(k, kp, "unknown key %q", k.value)
			}
			if err != nil {
				return nil, err
			}
		}
		out = append(out, c)
	}
	return out, nil
}

func (p *parser) cacheKey(n *node, key string, c *Cache) error {
	if n.kind == kindScalar {
		k := n.value
		if strings.Contains(k, "/") || strings.Contains(strings.ToLower(k), "%2f") || k == "." || k == ".." || strings.Contains(k, `\`) {
			return p.errorf(n, key, "%q cannot contain / or \\, or be . or ..", k)
		}
		c.Key = k
		return nil
	}
	h, err := p.hash(n, key)
	if err != nil {
		return err
	}
	for i, k := range h.keys {
		v, kp := h.vals[i], key+": "+k.value
		switch k.value {
		case "files":
			if c.KeyFiles, err = p.list(v, kp); err == nil && (len(c.KeyFiles) == 0 || len(c.KeyFiles) > 2) {
				err = p.errorf(v, kp, "should list one or two files")
			}
		case "prefix":
			c.KeyPrefix, err = p.str(v, kp)
		case "files_commits":
			p.warn(k, kp, "not supported by mayfly's coordinator; the key is \"default\"")
		default:
			return p.errorf(k, key, "unknown key %q (files, prefix)", k.value)
		}
		if err != nil {
			return err
		}
	}
	if len(c.KeyFiles) == 0 && c.KeyPrefix == "" {
		c.Key = "default"
	}
	return nil
}

func (p *parser) allowFailure(n *node, key string, j *Job) error {
	if n.kind == kindScalar {
		v, err := p.boolean(n, key)
		j.AllowFailure = v
		return err
	}
	h, err := p.hash(n, key)
	if err != nil {
		return err
	}
	for i, k := range h.keys {
		if k.value != "exit_codes" {
			return p.errorf(k, key, "unknown key %q (exit_codes)", k.value)
		}
		if j.AllowFailureExitCodes, err = p.ints(h.vals[i], key+": exit_codes"); err != nil {
			return err
		}
	}
	return nil
}

// retryReasons are the failure kinds retry:when accepts.
var retryReasons = []string{"always", "unknown_failure", "script_failure", "api_failure",
	"stuck_or_timeout_failure", "runner_system_failure", "runner_unsupported", "stale_schedule",
	"job_execution_timeout", "archived_failure", "unmet_prerequisites", "scheduler_failure",
	"data_integrity_failure"}

func (p *parser) retry(n *node, key string) (Retry, error) {
	var r Retry
	var err error
	if n.kind == kindScalar {
		r.Max, err = p.integer(n, key)
	} else {
		h, herr := p.hash(n, key)
		if herr != nil {
			return r, herr
		}
		for i, k := range h.keys {
			v, kp := h.vals[i], key+": "+k.value
			switch k.value {
			case "max":
				r.Max, err = p.integer(v, kp)
			case "when":
				if r.When, err = p.strList(v, kp); err == nil {
					for _, w := range r.When {
						if !slices.Contains(retryReasons, w) {
							err = p.errorf(v, kp, "%q is not a failure reason retry: knows", w)
						}
					}
				}
			case "exit_codes":
				r.ExitCodes, err = p.ints(v, kp)
			default:
				return r, p.errorf(k, key, "unknown key %q (max, when, exit_codes)", k.value)
			}
			if err != nil {
				return r, err
			}
		}
	}
	if err == nil && (r.Max < 0 || r.Max > 2) {
		err = p.errorf(n, key, "max should be 0, 1 or 2")
	}
	return r, err
}

func (p *parser) parallel(n *node, key string, j *Job) error {
	if n.kind == kindScalar {
		v, err := p.integer(n, key)
		if err == nil && (v < 1 || v > 200) {
			err = p.errorf(n, key, "should be between 1 and 200")
		}
		j.Parallel = v
		return err
	}
	h, err := p.hash(n, key)
	if err != nil {
		return err
	}
	m := h.get("matrix")
	if m == nil || len(h.keys) != 1 || m.kind != kindSeq {
		return p.errorf(n, key, "should be a number or a hash with matrix: (a list of hashes)")
	}
	total := 0
	for i, it := range m.items {
		kp := fmt.Sprintf("%s: matrix[%d]", key, i)
		e, err := p.hash(it, kp)
		if err != nil {
			return err
		}
		var row MatrixRow
		combos := 1
		for k, vk := range e.keys {
			if !varName.MatchString(vk.value) {
				return p.errorf(vk, kp, "%q is not a variable name", vk.value)
			}
			vals, err := p.strList(e.vals[k], kp+": "+vk.value)
			if err != nil {
				return err
			}
			if len(vals) == 0 {
				return p.errorf(e.vals[k], kp+": "+vk.value, "needs at least one value")
			}
			row = append(row, MatrixVar{Name: vk.value, Values: vals})
			combos *= max(len(vals), 1)
			if combos > 200 {
				break
			}
		}
		if total += combos; total > 200 {
			return p.errorf(n, key, "the matrix makes more than 200 jobs")
		}
		j.Matrix = append(j.Matrix, row)
	}
	return nil
}
