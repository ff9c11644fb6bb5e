package manager

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
)

// Phases of a job, as values of the phase label of mayfly_job_phase_seconds
// and in the debug log.
const (
	PhaseRequest     = "request"      // the job request that returned the job
	PhaseReserve     = "reserve"      // the fleet's promise of an instance
	PhaseAcquire     = "acquire"      // taking the promised instance
	PhaseConnect     = "connect"      // opening (or taking over) the connection
	PhaseReadyCheck  = "ready_check"  // checking a warm connection before use
	PhaseUpload      = "upload"       // file variables and scripts
	PhaseTraceFlush  = "trace_flush"  // each PATCH of the trace
	PhaseFinalUpdate = "final_update" // the last trace bytes and the final PUT
	PhaseRelease     = "release"      // ending the lease (the instance's deletion starts)
	PhaseReattach    = "reattach"     // a restarted manager finding a running job again
	// Stages are "stage_" + the stage name for the runner's stages and
	// step_script; other user steps share "stage_step_other".
	phaseStagePrefix = "stage_"
)

// stagePhase is the phase label of a stage: bounded, whatever the job's
// own step names.
func stagePhase(name buildscript.StageName) string {
	switch name {
	case buildscript.StagePrepare, buildscript.StageGetSources, buildscript.StageRestoreCache,
		buildscript.StageDownloadArtifacts, buildscript.StageStepScript, buildscript.StageAfterScript,
		buildscript.StageArchiveCache, buildscript.StageArchiveCacheOnFailure,
		buildscript.StageUploadArtifactsOnSuccess, buildscript.StageUploadArtifactsOnFailure:
		return phaseStagePrefix + string(name)
	}
	if strings.HasPrefix(string(name), "step_") {
		return phaseStagePrefix + "step_other"
	}
	return phaseStagePrefix + "other"
}

// phaseLog times the phases of one job: each goes to the histogram at
// once, and the whole breakdown to the debug log when the job ends.
type phaseLog struct {
	m      *metrics
	runner string
	now    func() time.Time

	mu    sync.Mutex
	spans []phaseSpan
}

type phaseSpan struct {
	phase string
	d     time.Duration
}

func newPhaseLog(m *metrics, runner string, now func() time.Time) *phaseLog {
	return &phaseLog{m: m, runner: runner, now: now}
}

// since records phase as having taken from start until now.
func (p *phaseLog) since(phase string, start time.Time) {
	p.add(phase, p.now().Sub(start))
}

// add records one span of phase. It is safe for concurrent use (trace
// flushes happen on the trace's own goroutine).
func (p *phaseLog) add(phase string, d time.Duration) {
	if p == nil {
		return
	}
	p.m.phase.WithLabelValues(p.runner, phase).Observe(d.Seconds())
	p.mu.Lock()
	p.spans = append(p.spans, phaseSpan{phase, d})
	p.mu.Unlock()
}

// log writes the breakdown at debug level: each phase's total time, in
// the order the phases first happened, and how often those that happened
// more than once did.
func (p *phaseLog) log(log *slog.Logger) {
	if !log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var order []string
	total := map[string]time.Duration{}
	count := map[string]int{}
	for _, s := range p.spans {
		if _, ok := total[s.phase]; !ok {
			order = append(order, s.phase)
		}
		total[s.phase] += s.d
		count[s.phase]++
	}
	attrs := make([]any, 0, len(order))
	var counts []any
	for _, ph := range order {
		attrs = append(attrs, slog.Duration(ph, total[ph].Round(10*time.Microsecond)))
		if count[ph] > 1 {
			counts = append(counts, slog.Int(ph, count[ph]))
		}
	}
	log.Debug("job phases", slog.Group("phases", attrs...), slog.Group("count", counts...))
}
