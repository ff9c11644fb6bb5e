// Package gitlabci reads a project's .gitlab-ci.yml as GitLab does and makes
// the jobs of a pipeline from it, for mayfly's built-in coordinator.
//
// Parse loads the file (YAML anchors, aliases and << merge keys, include:
// local, extends: with hidden .jobs, !reference, default:) and decodes every
// job; Config.Evaluate applies workflow:rules, rules:, only:/except:,
// inherit:, parallel: and checks needs: and dependencies: for one pipeline.
//
// Supported keywords:
//
//	top level   stages (types), variables, default, workflow (rules, name), include (local),
//	            image, services, cache, before_script, after_script (as default:)
//	job         stage, image, services, variables, before_script, script, after_script,
//	            needs, dependencies, artifacts (paths, exclude, untracked, when, expire_in,
//	            name, reports), cache (key, key:files, key:prefix, paths, untracked, policy,
//	            when, unprotect, fallback_keys), tags, timeout, allow_failure (and exit_codes),
//	            when (on_success, on_failure, always, manual), retry (max, when, exit_codes),
//	            parallel (N and matrix), extends, rules (if, when, allow_failure, variables,
//	            exists), only/except (refs, variables), inherit, hooks:pre_get_sources_script
//
// Keywords read but not implemented give one Warning each (file, line,
// key) and the job runs without them: environment, coverage, interruptible,
// resource_group, release, pages, secrets, id_tokens, identity,
// dast_configuration, manual_confirmation, start_in and when: delayed (the
// job starts at once), rules:changes (the rule matches), rules:needs,
// only/except:changes and kubernetes, needs from other pipelines or projects,
// artifacts:expose_as/public/access, image and services docker:, kubernetes:
// and ports:, cache:key:files_commits, workflow:auto_cancel, spec:inputs,
// include: other than local. Jobs with trigger: or run: are skipped with a
// warning. Unknown keys and invalid values are errors (*Error) naming the
// file, line and key, as GitLab refuses such a file; nothing panics on any
// input (FuzzParse).
//
// Manual jobs are never run by the coordinator. Limits: a file of at most
// 2 MB (MaxFileBytes), nesting of at most 100 levels, 250 000 values after
// expanding aliases, 150 includes, extends 11 levels deep.
package gitlabci
