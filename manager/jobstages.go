package manager

import (
	"context"
	"io"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
)

// timedRunner times every Run of a stage as that stage's phase.
type timedRunner struct {
	stagerun.Runner
	now    func() time.Time
	phases *phaseLog
}

func (t timedRunner) Run(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	start := t.now()
	defer func() {
		_, name, _, _ := stagerun.ParseStageID(s.ID)
		t.phases.since(stagePhase(buildscript.StageName(name)), start)
	}()
	return t.Runner.Run(ctx, s, out)
}
