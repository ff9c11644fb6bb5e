package coordinator

import (
	"errors"
	"fmt"
)

// Sentinel errors; the typed errors below match them with errors.Is.
var (
	// ErrNotFound: the group, project, pipeline, job or runner does not exist.
	ErrNotFound = errors.New("not found")
	// ErrInvalid: the input is malformed or fails validation.
	ErrInvalid = errors.New("invalid input")
	// ErrForbidden: a registration, runner or job token was not accepted.
	ErrForbidden = errors.New("forbidden")
	// ErrJobState: the job's status does not allow the operation.
	ErrJobState = errors.New("job status does not allow this")
	// ErrLocked: a locked project runner cannot be enabled for another project.
	ErrLocked = errors.New("runner is locked")
)

// NotFoundError names the kind of object and the key that was not found.
type NotFoundError struct {
	Kind string // "job", "project", "group", "runner", "pipeline"
	Key  string
}

// Error implements error.
func (e *NotFoundError) Error() string { return fmt.Sprintf("%s %s not found", e.Kind, e.Key) }

// Is reports whether target is ErrNotFound.
func (e *NotFoundError) Is(target error) bool { return target == ErrNotFound }

func notFound(kind string, key any) error {
	return &NotFoundError{Kind: kind, Key: fmt.Sprint(key)}
}

// FieldError is bad input: where it came from (a file name, "request"),
// the field path (projects[0].pipelines[0].jobs[2].script) and what is wrong.
type FieldError struct {
	Source string
	Field  string
	Msg    string
}

// Error implements error.
func (e *FieldError) Error() string {
	switch {
	case e.Source != "" && e.Field != "":
		return fmt.Sprintf("%s: %s: %s", e.Source, e.Field, e.Msg)
	case e.Field != "":
		return fmt.Sprintf("%s: %s", e.Field, e.Msg)
	case e.Source != "":
		return fmt.Sprintf("%s: %s", e.Source, e.Msg)
	}
	return e.Msg
}

// Is reports whether target is ErrInvalid.
func (e *FieldError) Is(target error) bool { return target == ErrInvalid }

// JobStateError is returned when an operation is refused because of a job's status.
type JobStateError struct {
	JobID  int64
	Status string
	Op     string
}

// Error implements error.
func (e *JobStateError) Error() string {
	return fmt.Sprintf("%s job %d: job is %s", e.Op, e.JobID, e.Status)
}

// Is reports whether target is ErrJobState.
func (e *JobStateError) Is(target error) bool { return target == ErrJobState }
