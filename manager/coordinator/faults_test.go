package coordinator

import (
	"errors"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

func TestInjectFault(t *testing.T) {
	e := newEnv(t, Config{})
	tok := e.register(runnerapi.RegisterRunnerRequest{Token: testRegToken, RunUntagged: true})
	for _, bad := range []Fault{
		{Endpoint: "nope", Status: 500, Times: 1},
		{Endpoint: FaultRequestJob, Status: 200, Times: 1},
		{Endpoint: FaultRequestJob, Status: 503, Times: 0},
	} {
		if err := e.s.InjectFault(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("InjectFault(%+v) = %v, want ErrInvalid", bad, err)
		}
	}
	if err := e.s.InjectFault(Fault{Endpoint: FaultRequestJob, Status: 503, Times: 2}); err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{503, 503, 204} {
		if r := e.doJSON("POST", "/api/v4/jobs/request", runnerapi.JobRequest{Token: tok}); r.status != want {
			t.Errorf("request %d: status %d, want %d", i, r.status, want)
		}
	}
	if n := e.s.FaultsServed(); n != 2 {
		t.Errorf("FaultsServed = %d, want 2", n)
	}
}
