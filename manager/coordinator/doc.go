// Package coordinator is an in-memory GitLab stand-in that speaks the runner
// API of GitLab (as gitlab-runner v14.10 uses it) for tests and the local
// demo (`mayfly coordinator`).
//
// It serves, under /api/v4:
//
//	POST   /runners          register with a registration token → 201 {id, token}; wrong token 403
//	POST   /runners/verify   200 for a known runner token, 403 otherwise
//	DELETE /runners          token in a JSON body → 204; 403 if unknown
//	POST   /jobs/request     201 job JSON, 204 nothing (echoing X-GitLab-Last-Update), 403 bad token
//	PATCH  /jobs/:id/trace   append at Content-Range start → 202 Range: 0-size; 416 on offset mismatch
//	PUT    /jobs/:id         running heartbeat, success/failed with reason, exit code and output checksum
//	POST   /jobs/:id/artifacts  multipart "file", artifact_type/artifact_format/expire_in → 201 (413 over MaxArtifactBytes)
//	GET    /jobs/:id/artifacts  the archive, to the job's token or that of a running job depending on it
//
//	POST   /projects/:id/pipeline  a pipeline from a served project's .gitlab-ci.yml (PRIVATE-TOKEN)
//
// and a separate admin API under /-/mayfly (see AdminPrefix). Artifacts
// are kept under Config.StateDir/artifacts until they expire (expire_in,
// or Config.ArtifactsExpireIn); a dotenv report's variables go to the jobs
// that download the job's artifacts, and the archive is their
// dependencies' artifacts_file. With
// AddProjects (mayfly coordinator --project) it also serves projects'
// repositories over git's smart HTTP at /<namespace>/<name>.git (package
// gitrepo; job tokens read them while their job runs) and makes pipelines
// from their .gitlab-ci.yml (package gitlabci); with Config.Registry it
// serves a container registry under /v2/ (package registry). Every URL in
// a job payload uses Config.ExternalURL, the coordinator as VMs see it.
//
// The data model follows GitLab: groups (with subgroups) hold projects,
// projects run pipelines, pipelines run jobs stage by stage. Runners get
// their scope from the registration token they used: the instance token
// makes an instance (shared) runner, which takes jobs through the fair-usage
// queue (the project with the fewest jobs running on instance runners first,
// then the lowest job id); a group's token makes a group runner and a
// project's token a project runner, both first-in first-out. A runner takes
// a job only if the job's tags are a subset of its own, untagged jobs only
// with run_untagged, nothing while paused; a locked project runner cannot be
// enabled for other projects.
//
// A running job no runner call touched for Config.StuckJobTimeout (default
// 1 hour) fails with stuck_or_timeout_failure, as GitLab's stuck-job
// clean-up fails it (DropStuckJobs, run by Serve or RunStuckJobSweep).
//
// Everything a runner sends is recorded per job (trace bytes, every trace
// patch and update, refused ones included with the status and reason, final
// state, failure reason, exit code, timestamps) and
// can be read with Server.Job, Server.Jobs and awaited with
// Server.WaitAllFinished.
package coordinator
