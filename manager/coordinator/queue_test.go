package coordinator

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// docsQueue builds the queue of GitLab's fair-usage examples
// (docs.gitlab.com/ci/runners/runners_scope, "How instance runners pick jobs"):
// jobs 1-3 for project 1, jobs 4-5 for project 2, job 6 for project 3.
func docsQueue(t *testing.T, e *env, group string) {
	t.Helper()
	e.project("project-1", group, jobs("job-1", "job-2", "job-3")...)
	e.project("project-2", group, jobs("job-4", "job-5")...)
	e.project("project-3", group, jobs("job-6")...)
	for i, rec := range e.s.Jobs() {
		if rec.ID != int64(i+1) || rec.Name != fmt.Sprintf("job-%d", i+1) {
			t.Fatalf("queue setup: job %d is %s", rec.ID, rec.Name)
		}
	}
}

// step is "pick" (expect job want) or "finish" (finish job want).
type step struct {
	op   string
	want int64
}

func runSteps(t *testing.T, e *env, token string, steps []step) {
	t.Helper()
	running := map[int64]*runnerapi.JobResponse{}
	var order []int64
	for i, st := range steps {
		switch st.op {
		case "pick":
			r, j := e.requestJob(token, "")
			if j == nil {
				t.Fatalf("step %d: pick got %d, want job %d (order so far %v)", i, r.status, st.want, order)
			}
			order = append(order, j.ID)
			if j.ID != st.want {
				t.Fatalf("step %d: picked job %d, want %d (order so far %v)", i, j.ID, st.want, order)
			}
			running[j.ID] = j
		case "finish":
			e.finish(running[st.want], runnerapi.StateSuccess, []byte("ok\n"))
		case "empty":
			if r, j := e.requestJob(token, ""); j != nil || r.status != http.StatusNoContent {
				t.Fatalf("step %d: want 204, got %d", i, r.status)
			}
		}
	}
}

func picks(ids ...int64) []step {
	out := make([]step, 0, len(ids)+1)
	for _, id := range ids {
		out = append(out, step{"pick", id})
	}
	return append(out, step{op: "empty"})
}

func TestFairUsageQueueDocsExamples(t *testing.T) {
	tests := []struct {
		name  string
		steps []step
	}{
		{
			// "When several CI/CD jobs run concurrently": 1, 4, 6, 2, 5, 3.
			name:  "example 1 concurrent",
			steps: picks(1, 4, 6, 2, 5, 3),
		},
		{
			// "When only one job runs at a time": 1 (finishes), 2, 4 (finishes), 5, 6, 3.
			name: "example 2 one at a time",
			steps: []step{
				{"pick", 1}, {"finish", 1},
				{"pick", 2}, {"pick", 4}, {"finish", 4},
				{"pick", 5}, {"pick", 6}, {"pick", 3},
				{op: "empty"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			docsQueue(t, e, "")
			runSteps(t, e, e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken}), tt.steps)
		})
	}
}

// Fair usage counts jobs running on instance runners only: jobs a project
// runs on its own runners do not push it back in the shared queue.
func TestFairUsageCountsOnlyInstanceRunners(t *testing.T) {
	e := newEnv(t, Config{})
	docsQueue(t, e, "")
	p1 := e.s.Projects()[0]
	own := e.register(runnerapi.RegisterRunnerRequest{Token: p1.RegistrationToken})
	shared := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	runSteps(t, e, own, []step{{"pick", 1}})
	// Project 1 runs job 1 on its own runner: for the shared queue it runs 0.
	runSteps(t, e, shared, picks(2, 4, 6, 3, 5))
	if rec, _ := e.s.Job(1); rec.RunnerType != ProjectRunner {
		t.Errorf("job 1 ran on %s", rec.RunnerType)
	}
}

func TestFIFOForGroupAndProjectRunners(t *testing.T) {
	tests := []struct {
		name  string
		token func(e *env) string
		steps []step
	}{
		{"group runner", func(e *env) string { return e.s.groupsByPath["acme"].regToken }, picks(1, 2, 3, 4, 5, 6)},
		{"project runner of project 2", func(e *env) string { return e.s.Projects()[1].RegistrationToken }, picks(4, 5)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			if _, err := e.s.CreateGroup(GroupSpec{Path: "acme"}); err != nil {
				t.Fatal(err)
			}
			docsQueue(t, e, "acme")
			runSteps(t, e, e.register(runnerapi.RegisterRunnerRequest{Token: tt.token(e)}), tt.steps)
		})
	}
}

func TestGroupRunnerScope(t *testing.T) {
	e := newEnv(t, Config{})
	for _, g := range []string{"acme", "acme/platform", "other"} {
		if _, err := e.s.CreateGroup(GroupSpec{Path: g}); err != nil {
			t.Fatal(err)
		}
	}
	e.project("a", "other", jobs("outside")...)             // job 1
	e.project("b", "acme/platform", jobs("in-subgroup")...) // job 2
	e.project("c", "", jobs("user-namespace")...)           // job 3
	e.project("d", "acme", jobs("in-group")...)             // job 4
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: e.s.groupsByPath["acme"].regToken})
	runSteps(t, e, tok, picks(2, 4))
	sub := e.register(runnerapi.RegisterRunnerRequest{Token: e.s.groupsByPath["acme/platform"].regToken})
	runSteps(t, e, sub, picks())
}

func TestSharedRunnersDisabled(t *testing.T) {
	e := newEnv(t, Config{})
	off := false
	if _, err := e.s.CreateProject(ProjectSpec{Name: "private", SharedRunners: &off, Pipelines: []PipelineSpec{{Jobs: jobs("a")}}}); err != nil {
		t.Fatal(err)
	}
	e.project("public", "", jobs("b")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
	runSteps(t, e, tok, picks(2))
}

func TestTagMatching(t *testing.T) {
	tests := []struct {
		name        string
		runnerTags  string
		runUntagged bool
		jobTags     []string
		want        bool
	}{
		{"untagged job, run_untagged", "", true, nil, true},
		{"untagged job, tagged runner with run_untagged", "linux", true, nil, true},
		{"untagged job, no run_untagged", "linux", false, nil, false},
		{"subset", "linux,small,docker", false, []string{"linux", "small"}, true},
		{"equal", "linux", false, []string{"linux"}, true},
		{"missing tag", "linux", true, []string{"linux", "gpu"}, false},
		{"tagged job, untagged runner", "", true, []string{"linux"}, false},
		{"case sensitive", "Linux", false, []string{"linux"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			e.project("p", "", JobSpec{Name: "j", Script: []string{"true"}, Tags: tt.jobTags})
			tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, TagList: tt.runnerTags, RunUntagged: tt.runUntagged})
			r, j := e.requestJob(tok, "")
			if got := j != nil; got != tt.want {
				t.Errorf("took job = %v (status %d), want %v", got, r.status, tt.want)
			}
		})
	}
}

// A runner skips jobs it cannot run and takes the next one it can.
func TestTagsSkipToNextRunnableJob(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", JobSpec{Name: "gpu", Script: []string{"x"}, Tags: []string{"gpu"}}, JobSpec{Name: "any", Script: []string{"x"}})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, TagList: "linux", RunUntagged: true})
	runSteps(t, e, tok, picks(2))
	gpu := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, TagList: "gpu,linux"})
	runSteps(t, e, gpu, picks(1))
}

func TestPausedRunnerGetsNothing(t *testing.T) {
	e := newEnv(t, Config{})
	e.project("p", "", jobs("a")...)
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, Active: false, Paused: ptr(true)})
	r, j := e.requestJob(tok, "")
	if j != nil || r.status != 204 || r.header.Get(runnerapi.HeaderLastUpdate) == "" {
		t.Fatalf("paused runner: %d, header %q", r.status, r.header.Get(runnerapi.HeaderLastUpdate))
	}
	paused := r.header.Get(runnerapi.HeaderLastUpdate)
	id := e.s.Runners()[0].ID
	if err := e.s.SetRunnerPaused(id, false); err != nil {
		t.Fatal(err)
	}
	// Resuming changes the queue version, so the paused-time value does not short-circuit.
	if r, j := e.requestJob(tok, paused); j == nil {
		t.Fatalf("resumed runner: %d", r.status)
	}
	if err := e.s.SetRunnerPaused(99, true); !isNotFound(err) {
		t.Errorf("pause unknown runner: %v", err)
	}
}

func TestLockedProjectRunner(t *testing.T) {
	e := newEnv(t, Config{})
	p1 := e.project("one", "", jobs("a")...)
	p2 := e.project("two", "", jobs("b")...)
	locked := e.register(runnerapi.RegisterRunnerRequest{Token: p1.RegistrationToken, Locked: true})
	open := e.register(runnerapi.RegisterRunnerRequest{Token: p1.RegistrationToken, Locked: false})
	ids := map[string]int64{}
	for _, r := range e.s.Runners() {
		ids[r.Token] = r.ID
	}
	if err := e.s.EnableRunnerForProject(ids[locked], p2.ID); err == nil || !errorsIsLocked(err) {
		t.Fatalf("enable locked runner: %v, want ErrLocked", err)
	}
	// The locked runner serves only its project.
	runSteps(t, e, locked, picks(1))
	// The unlocked one can be enabled for project two and then serves it.
	runSteps(t, e, open, picks())
	if err := e.s.EnableRunnerForProject(ids[open], p2.ID); err != nil {
		t.Fatal(err)
	}
	runSteps(t, e, open, picks(2))
}

func errorsIsLocked(err error) bool { return err != nil && errors.Is(err, ErrLocked) }

func ptr[T any](v T) *T { return &v }

// The ref_protected access level only takes jobs of protected refs.
func TestProtectedRunner(t *testing.T) {
	e := newEnv(t, Config{})
	p, _ := e.s.CreateProject(ProjectSpec{Name: "p"})
	if _, err := e.s.EnqueuePipeline(p.ID, PipelineSpec{Ref: "feature", Jobs: jobs("unprotected")}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.EnqueuePipeline(p.ID, PipelineSpec{Ref: "main", Protected: true, Jobs: jobs("protected")}); err != nil {
		t.Fatal(err)
	}
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, AccessLevel: AccessRefProtected})
	runSteps(t, e, tok, picks(2))
}

func TestStagesRunInOrder(t *testing.T) {
	twoStages := func(buildFails, allowFailure bool) PipelineSpec {
		return PipelineSpec{Stages: []string{"build", "test"}, Jobs: []JobSpec{
			{Name: "compile", Stage: "build", Script: []string{"make"}, AllowFailure: &allowFailure},
			{Name: "lint", Stage: "build", Script: []string{"lint"}},
			{Name: "unit", Stage: "test", Script: []string{"test"}},
		}}
	}
	tests := []struct {
		name         string
		spec         PipelineSpec
		compileState string
		wantUnit     string
	}{
		{"success advances", twoStages(false, false), runnerapi.StateSuccess, StatusPending},
		{"failure skips", twoStages(true, false), runnerapi.StateFailed, StatusSkipped},
		{"allowed failure advances", twoStages(true, true), runnerapi.StateFailed, StatusPending},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			p, _ := e.s.CreateProject(ProjectSpec{Name: "p"})
			if _, err := e.s.EnqueuePipeline(p.ID, tt.spec); err != nil {
				t.Fatal(err)
			}
			tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken})
			if got := e.status(3); got != StatusCreated {
				t.Fatalf("unit before build finished: %s", got)
			}
			compile, lint := e.mustJob(tok), e.mustJob(tok)
			if r, _ := e.requestJob(tok, ""); r.status != 204 {
				t.Fatalf("test stage handed out before build finished: %d", r.status)
			}
			e.finish(compile, tt.compileState, nil)
			if got := e.status(3); got != StatusCreated {
				t.Fatalf("unit while lint runs: %s", got)
			}
			e.finish(lint, runnerapi.StateSuccess, nil)
			if got := e.status(3); got != tt.wantUnit {
				t.Errorf("unit = %s, want %s", got, tt.wantUnit)
			}
		})
	}
}

// Checklist 9: a job is never handed out twice, also under 200 concurrent requests.
func TestNoDoubleAssignmentUnderConcurrency(t *testing.T) {
	e := newEnv(t, Config{})
	const nJobs, nRequests, nRunners = 120, 200, 10
	for p := 0; p < 6; p++ {
		var js []JobSpec
		for k := 0; k < nJobs/6; k++ {
			js = append(js, JobSpec{Name: fmt.Sprintf("j%d", k), Script: []string{"true"}})
		}
		e.project(fmt.Sprintf("p%d", p), "", js...)
	}
	var tokens []string
	for i := 0; i < nRunners; i++ {
		tokens = append(tokens, e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken}))
	}
	var (
		mu     sync.Mutex
		seen   = map[int64]int{}
		tokSet = map[string]bool{}
		codes  = map[int]int{}
		wg     sync.WaitGroup
		start  = make(chan struct{})
	)
	for i := 0; i < nRequests; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			r, j := e.requestJob(tokens[i%nRunners], "")
			mu.Lock()
			defer mu.Unlock()
			codes[r.status]++
			if j != nil {
				seen[j.ID]++
				tokSet[j.Token] = true
			}
		}(i)
	}
	close(start)
	wg.Wait()
	if codes[201] != nJobs || codes[204] != nRequests-nJobs || len(codes) != 2 {
		t.Errorf("status counts %v, want %d×201 and %d×204", codes, nJobs, nRequests-nJobs)
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("job %d handed out %d times", id, n)
		}
	}
	if len(seen) != nJobs || len(tokSet) != nJobs {
		t.Errorf("%d distinct jobs, %d distinct tokens, want %d", len(seen), len(tokSet), nJobs)
	}
	running := 0
	for _, rec := range e.s.Jobs() {
		if rec.Status == StatusRunning {
			running++
		}
	}
	if running != nJobs {
		t.Errorf("%d jobs running, want %d", running, nJobs)
	}
	for _, p := range e.s.Projects() {
		if p.RunningShared != nJobs/6 || p.PendingJobs != 0 {
			t.Errorf("project %s: running on shared %d pending %d", p.Path, p.RunningShared, p.PendingJobs)
		}
	}
}
