package gitlabci

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// Env is what a pipeline knows when it is created.
type Env struct {
	// Vars are the pipeline's predefined variables that rules may read:
	// CI_COMMIT_BRANCH or CI_COMMIT_TAG, CI_COMMIT_REF_NAME,
	// CI_PIPELINE_SOURCE, CI_DEFAULT_BRANCH, CI_PROJECT_PATH, …
	Vars map[string]string
	// Exists reports whether a file of the commit matches a glob (rules:exists).
	// Nil: no file matches.
	Exists func(glob string) bool
}

// Plan is the pipeline a configuration makes in an Env: the jobs that the
// rules keep, parallel jobs expanded, needs and dependencies checked.
type Plan struct {
	Name   string // workflow:name
	Stages []string
	// Variables are the global variables (workflow rules' ones included).
	Variables []Variable
	Jobs      []*Job
}

// ErrNoPipeline is returned (wrapped in a *NoPipelineError) when workflow
// rules or job rules leave nothing to run, as GitLab then creates no pipeline.
var ErrNoPipeline = errors.New("no pipeline")

// NoPipelineError says why no pipeline is created.
type NoPipelineError struct{ Reason string }

func (e *NoPipelineError) Error() string        { return "no pipeline created: " + e.Reason }
func (e *NoPipelineError) Is(target error) bool { return target == ErrNoPipeline }

// Evaluate makes the pipeline of cfg for env. It does not change cfg.
func (c *Config) Evaluate(env Env) (*Plan, error) {
	vars := maps.Clone(env.Vars)
	if vars == nil {
		vars = map[string]string{}
	}
	plan := &Plan{Stages: slices.Clone(c.Stages), Variables: slices.Clone(c.Variables)}
	for _, v := range c.Variables {
		vars[v.Key] = v.Value // YAML variables take precedence over predefined ones
	}
	if wf := c.Workflow; wf != nil {
		plan.Name = wf.Name
		if wf.Rules != nil {
			m, err := firstMatch(wf.Rules, vars, env.Exists)
			if err != nil {
				return nil, &Error{File: c.File, Line: wf.Line, Key: "workflow: rules", Msg: err.Error()}
			}
			if !m.matched {
				return nil, &NoPipelineError{Reason: "no workflow:rules rule matches"}
			}
			if m.rule.When == "never" {
				return nil, &NoPipelineError{Reason: fmt.Sprintf("the workflow:rules rule at line %d says when: never", m.rule.Line)}
			}
			plan.Variables = mergeVars(plan.Variables, m.rule.Variables)
			for _, v := range m.rule.Variables {
				vars[v.Key] = v.Value
			}
		}
	}
	for _, j := range c.Jobs {
		jobs, err := c.planJob(j, plan.Variables, vars, env)
		if err != nil {
			return nil, err
		}
		plan.Jobs = append(plan.Jobs, jobs...)
	}
	if len(plan.Jobs) == 0 {
		return nil, &NoPipelineError{Reason: "no job matches its rules, only: or except:"}
	}
	if err := c.checkNeeds(plan); err != nil {
		return nil, err
	}
	return plan, nil
}

// planJob applies rules (or only/except), inherit:variables and parallel: to one job.
func (c *Config) planJob(j *Job, global []Variable, pipelineVars map[string]string, env Env) ([]*Job, error) {
	out := *j
	out.Variables = nil
	switch {
	case j.inheritNoVars:
	case j.InheritVariables != nil:
		for _, v := range global {
			if slices.Contains(j.InheritVariables, v.Key) {
				out.Variables = append(out.Variables, v)
			}
		}
	default:
		out.Variables = slices.Clone(global)
	}
	out.Variables = mergeVars(out.Variables, j.Variables)
	vars := maps.Clone(pipelineVars)
	for _, v := range j.Variables {
		vars[v.Key] = v.Value
	}
	switch {
	case j.Rules != nil:
		m, err := firstMatch(j.Rules, vars, env.Exists)
		if err != nil {
			return nil, &Error{File: j.File, Line: j.Line, Key: j.Name + ": rules", Msg: err.Error()}
		}
		if !m.matched || m.rule.When == "never" {
			return nil, nil
		}
		if m.rule.When != "" {
			out.When = m.rule.When
			if out.When == "manual" && m.rule.AllowFailure == nil {
				out.AllowFailure = true
			}
		}
		if m.rule.AllowFailure != nil {
			out.AllowFailure = *m.rule.AllowFailure
		}
		out.Variables = mergeVars(out.Variables, m.rule.Variables)
	default:
		only := j.Only
		if only == nil {
			only = &RefFilter{Refs: []string{"branches", "tags"}}
		}
		ok, err := only.matches(vars)
		if err == nil && ok && j.Except != nil {
			var ex bool
			ex, err = j.Except.matches(vars)
			ok = !ex
		}
		if err != nil {
			return nil, &Error{File: j.File, Line: j.Line, Key: j.Name + ": only/except", Msg: err.Error()}
		}
		if !ok {
			return nil, nil
		}
	}
	return expandParallel(&out), nil
}

// mergeVars appends over to base, replacing variables base already has.
func mergeVars(base, over []Variable) []Variable {
	out := slices.Clone(base)
	for _, v := range over {
		if i := slices.IndexFunc(out, func(b Variable) bool { return b.Key == v.Key }); i >= 0 {
			out[i] = v
			continue
		}
		out = append(out, v)
	}
	return out
}

// expandParallel makes the instances of parallel: N ("name i/N") and
// parallel:matrix ("name: [a, b]"), with CI_NODE_INDEX and CI_NODE_TOTAL.
func expandParallel(j *Job) []*Job {
	type inst struct {
		name string
		vars []Variable
	}
	var insts []inst
	switch {
	case len(j.Matrix) > 0:
		for _, row := range j.Matrix {
			combos := [][]Variable{nil}
			for _, mv := range row {
				var next [][]Variable
				for _, c := range combos {
					for _, val := range mv.Values {
						next = append(next, append(slices.Clone(c), Variable{Key: mv.Name, Value: val}))
					}
				}
				combos = next
			}
			for _, c := range combos {
				vals := make([]string, len(c))
				for i, v := range c {
					vals[i] = v.Value
				}
				insts = append(insts, inst{name: fmt.Sprintf("%s: [%s]", j.Name, strings.Join(vals, ", ")), vars: c})
			}
		}
	case j.Parallel > 1:
		for i := 1; i <= j.Parallel; i++ {
			insts = append(insts, inst{name: fmt.Sprintf("%s %d/%d", j.Name, i, j.Parallel)})
		}
	default:
		return []*Job{j}
	}
	out := make([]*Job, 0, len(insts))
	for i, in := range insts {
		c := *j
		c.Name = in.name
		c.Variables = mergeVars(slices.Clone(j.Variables), append(in.vars,
			Variable{Key: "CI_NODE_INDEX", Value: strconv.Itoa(i + 1)},
			Variable{Key: "CI_NODE_TOTAL", Value: strconv.Itoa(len(insts))}))
		c.parallelOf = j.Name
		out = append(out, &c)
	}
	return out
}

// checkNeeds expands needs: and dependencies: to the planned job names
// (a parallel job's name stands for all its instances) and checks them.
func (c *Config) checkNeeds(plan *Plan) error {
	byName := map[string][]*Job{}
	stageOf := func(j *Job) int { return slices.Index(plan.Stages, j.Stage) }
	for _, j := range plan.Jobs {
		byName[j.Name] = append(byName[j.Name], j)
		if j.parallelOf != "" {
			byName[j.parallelOf] = append(byName[j.parallelOf], j)
		}
	}
	for _, j := range plan.Jobs {
		if j.Needs != nil {
			var needs []Need
			for _, n := range *j.Needs {
				targets := byName[n.Job]
				if len(targets) == 0 {
					if n.Optional {
						continue
					}
					return &Error{File: j.File, Line: j.Line, Key: j.Name + ": needs", Msg: fmt.Sprintf("job %q is not in this pipeline (add optional: true if rules may leave it out)", n.Job)}
				}
				for _, t := range targets {
					if stageOf(t) > stageOf(j) {
						return &Error{File: j.File, Line: j.Line, Key: j.Name + ": needs", Msg: fmt.Sprintf("job %q is in a later stage (%s)", t.Name, t.Stage)}
					}
					if t == j {
						return &Error{File: j.File, Line: j.Line, Key: j.Name + ": needs", Msg: "a job cannot need itself"}
					}
					needs = append(needs, Need{Job: t.Name, NoArtifacts: n.NoArtifacts, Optional: n.Optional})
				}
			}
			j.Needs = &needs
		}
		if j.Dependencies != nil {
			var deps []string
			for _, d := range *j.Dependencies {
				targets := byName[d]
				if len(targets) == 0 {
					return &Error{File: j.File, Line: j.Line, Key: j.Name + ": dependencies", Msg: fmt.Sprintf("job %q is not in this pipeline", d)}
				}
				for _, t := range targets {
					inNeeds := j.Needs != nil && slices.ContainsFunc(*j.Needs, func(n Need) bool { return n.Job == t.Name })
					if stageOf(t) >= stageOf(j) && !inNeeds {
						return &Error{File: j.File, Line: j.Line, Key: j.Name + ": dependencies", Msg: fmt.Sprintf("job %q is not in an earlier stage", t.Name)}
					}
					deps = append(deps, t.Name)
				}
			}
			j.Dependencies = &deps
		}
	}
	return checkCycles(plan.Jobs)
}

// checkCycles refuses needs: that loop (possible within one stage).
func checkCycles(jobs []*Job) error {
	idx := map[string]*Job{}
	for _, j := range jobs {
		idx[j.Name] = j
	}
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(j *Job, path []string) error
	visit = func(j *Job, path []string) error {
		switch state[j.Name] {
		case 1:
			return &Error{File: j.File, Line: j.Line, Key: j.Name + ": needs", Msg: "needs form a cycle: " + strings.Join(append(path, j.Name), " → ")}
		case 2:
			return nil
		}
		state[j.Name] = 1
		if j.Needs != nil {
			for _, n := range *j.Needs {
				if t := idx[n.Job]; t != nil {
					if err := visit(t, append(path, j.Name)); err != nil {
						return err
					}
				}
			}
		}
		state[j.Name] = 2
		return nil
	}
	for _, j := range jobs {
		if err := visit(j, nil); err != nil {
			return err
		}
	}
	return nil
}
