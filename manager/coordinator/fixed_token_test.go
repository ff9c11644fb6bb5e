package coordinator

import (
	"errors"
	"testing"

	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// A runner registered with a fixed token authenticates with it, and a second
// runner cannot take the same token.
func TestRegisterRunnerWithFixedToken(t *testing.T) {
	e := newEnv(t, Config{})
	r, err := e.s.RegisterRunner(RunnerOptions{RegistrationToken: testRegToken, RunUntagged: true, Token: "local-runner-token"})
	if err != nil {
		t.Fatalf("RegisterRunner: %v", err)
	}
	if r.Token != "local-runner-token" {
		t.Errorf("token = %q, want the fixed one", r.Token)
	}
	if res := e.doJSON("POST", "/api/v4/runners/verify", runnerapi.RunnerTokenRequest{Token: "local-runner-token"}); res.status != 200 {
		t.Errorf("verify with the fixed token: status %d", res.status)
	}
	_, err = e.s.RegisterRunner(RunnerOptions{RegistrationToken: testRegToken, RunUntagged: true, Token: "local-runner-token"})
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("second runner with the same token: err = %v, want ErrInvalid", err)
	}
}
