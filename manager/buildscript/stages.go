package buildscript

import (
	"fmt"
	"time"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// stageTitles are the section headers gitlab-runner prints for its stages.
var stageTitles = map[StageName]string{
	StagePrepare:                  "Preparing environment",
	StageGetSources:               "Getting source from Git repository",
	StageRestoreCache:             "Restoring cache",
	StageDownloadArtifacts:        "Downloading artifacts",
	StageAfterScript:              "Running after_script",
	StageArchiveCache:             "Saving cache for successful job",
	StageArchiveCacheOnFailure:    "Saving cache for failed job",
	StageUploadArtifactsOnSuccess: "Uploading artifacts for successful job",
	StageUploadArtifactsOnFailure: "Uploading artifacts for failed job",
}

// Title returns the section header of a stage.
func Title(name StageName) string {
	if t, ok := stageTitles[name]; ok {
		return t
	}
	return fmt.Sprintf("Executing %q stage of the job script", string(name))
}

// stages builds every stage in run order. Cache and artifact stages appear
// only when the job asks for cache or artifacts, as in gitlab-runner; they
// run mayfly-helper (cache.go), or say they are not supported without it.
func (g *generator) stages() error {
	p, j := g.plan, g.job
	add := func(name StageName, when string, allowFailure bool, body func(w shellWriter)) *Stage {
		w := g.newWriter()
		body(w)
		p.Stages = append(p.Stages, Stage{
			Name: name, Title: Title(name), Script: w.finish(),
			When: when, AllowFailure: allowFailure, Attempts: 1,
		})
		return &p.Stages[len(p.Stages)-1]
	}

	add(StagePrepare, WhenOnSuccess, false, func(w shellWriter) {
		w.hostLine(g.opts.Via)
	})

	gsAttempts := g.attempts("GET_SOURCES_ATTEMPTS")
	gs := add(StageGetSources, WhenOnSuccess, false, func(w shellWriter) {
		g.exports(w)
		g.getSources(w, gsAttempts > 1)
	})
	gs.Attempts = gsAttempts

	if pulls := cacheEntries(j.Cache, "pull"); len(pulls) > 0 {
		st := add(StageRestoreCache, WhenOnSuccess, false, func(w shellWriter) {
			g.exports(w)
			w.cd(p.ProjectDir)
			g.restoreCache(w, pulls)
		})
		st.Attempts = g.attempts("RESTORE_CACHE_ATTEMPTS")
	}
	if hasDependencyArtifacts(j.Dependencies) {
		st := add(StageDownloadArtifacts, WhenOnSuccess, false, func(w shellWriter) {
			g.exports(w)
			w.cd(p.ProjectDir)
			g.downloadArtifacts(w)
		})
		st.Attempts = g.attempts("ARTIFACT_DOWNLOAD_ATTEMPTS")
	}

	for _, step := range j.Steps {
		if step.Name == runnerapi.StepAfterScript {
			continue
		}
		st := add(StageName("step_"+step.Name), WhenOnSuccess, step.AllowFailure, func(w shellWriter) {
			g.exports(w)
			w.cd(p.ProjectDir)
			if g.opts.PreBuildScript != "" {
				w.userCommand(g.opts.PreBuildScript)
			}
			for _, c := range step.Script {
				w.userCommand(c)
			}
			if g.opts.PostBuildScript != "" {
				w.userCommand(g.opts.PostBuildScript)
			}
		})
		st.User = true
	}

	for _, step := range j.Steps {
		if step.Name != runnerapi.StepAfterScript || len(step.Script) == 0 {
			continue
		}
		st := add(StageAfterScript, WhenAlways, true, func(w shellWriter) {
			g.exports(w)
			w.cd(p.ProjectDir)
			w.notice("Running after script...")
			for _, c := range step.Script {
				w.userCommand(c)
			}
		})
		st.Timeout = g.afterScriptTimeout()
		break
	}

	if pushes := cacheEntries(j.Cache, "push"); len(pushes) > 0 {
		for _, s := range []struct {
			name StageName
			when string
			ok   bool
		}{{StageArchiveCache, WhenOnSuccess, true}, {StageArchiveCacheOnFailure, WhenOnFailure, false}} {
			if !anyCacheWhen(pushes, s.ok) {
				continue
			}
			add(s.name, s.when, true, func(w shellWriter) {
				g.exports(w)
				w.cd(p.ProjectDir)
				g.archiveCache(w, pushes, s.ok)
			})
		}
	}
	for _, s := range []struct {
		name StageName
		when string
		ok   bool
	}{{StageUploadArtifactsOnSuccess, WhenOnSuccess, true}, {StageUploadArtifactsOnFailure, WhenOnFailure, false}} {
		if !anyArtifactWhen(j.Artifacts, s.ok) {
			continue
		}
		add(s.name, s.when, false, func(w shellWriter) {
			g.exports(w)
			w.cd(p.ProjectDir)
			g.uploadArtifacts(w, s.ok)
		})
	}
	return nil
}

// exports writes every variable; file variables hold their file's path.
func (g *generator) exports(w shellWriter) {
	for _, v := range g.vars {
		w.export(v.key, v.value)
	}
}

// afterScriptTimeout reads RUNNER_AFTER_SCRIPT_TIMEOUT (a Go duration).
func (g *generator) afterScriptTimeout() time.Duration {
	s := g.value("RUNNER_AFTER_SCRIPT_TIMEOUT")
	if s == "" {
		return DefaultAfterScriptTimeout
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		g.plan.Warnings = append(g.plan.Warnings, fmt.Sprintf("variable RUNNER_AFTER_SCRIPT_TIMEOUT %q: want a positive duration such as 10m; using %s", s, DefaultAfterScriptTimeout))
		return DefaultAfterScriptTimeout
	}
	return d
}

// cacheEntries returns the cache entries with something to cache that the
// policy lets pull ("pull") or push ("push"); the default policy is pull-push.
func cacheEntries(cs []runnerapi.Cache, dir string) []runnerapi.Cache {
	var out []runnerapi.Cache
	for _, c := range cs {
		if len(c.Paths) == 0 && !c.Untracked {
			continue
		}
		pol := c.Policy
		if pol == "" {
			pol = "pull-push"
		}
		if pol == "pull-push" || pol == dir {
			out = append(out, c)
		}
	}
	return out
}

// anyCacheWhen reports whether a cache entry is saved after a successful
// (ok) or failed job; cache:when defaults to on_success.
func anyCacheWhen(cs []runnerapi.Cache, ok bool) bool {
	for _, c := range cs {
		if whenMatches(c.When, ok) {
			return true
		}
	}
	return false
}

// anyArtifactWhen reports whether an artifact with paths is uploaded after a
// successful (ok) or failed job; artifacts:when defaults to on_success.
func anyArtifactWhen(as []runnerapi.Artifact, ok bool) bool {
	for _, a := range as {
		if (len(a.Paths) > 0 || a.Untracked) && whenMatches(a.When, ok) {
			return true
		}
	}
	return false
}

func whenMatches(when string, ok bool) bool {
	switch when {
	case "", WhenOnSuccess:
		return ok
	case WhenOnFailure:
		return !ok
	case WhenAlways:
		return true
	}
	return false
}

func hasDependencyArtifacts(ds []runnerapi.Dependency) bool {
	for _, d := range ds {
		if d.ArtifactsFile.Filename != "" {
			return true
		}
	}
	return false
}
