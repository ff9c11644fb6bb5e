package stagerun

// Failure is a Run error that names the failure reason GitLab should get,
// such as image_pull_failure when the job's image cannot be pulled, for
// failures that are neither the script's nor the transport's.
type Failure struct {
	// Reason is a GitLab failure reason (see runnerapi); one GitLab does
	// not accept is mapped as gitlab-runner maps it (buildscript.Decide).
	Reason string
	// Err says what failed; it ends the trace's "ERROR: Job failed" line.
	Err error
}

// Error implements error.
func (f *Failure) Error() string { return f.Err.Error() }

// Unwrap returns Err.
func (f *Failure) Unwrap() error { return f.Err }
