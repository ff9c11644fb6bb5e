package aws_test

import (
	"slices"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
)

func TestListPaging(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	ids, err := p.Create(ctxT(t), 12, labels)
	if err != nil {
		t.Fatal(err)
	}
	// Instances of another group or without a manager tag stay out.
	other := start(t, e.with("name_prefix", "other"))
	if _, err := other.Create(ctxT(t), 2, labels); err != nil {
		t.Fatal(err)
	}
	e.srv.ResetCalls()
	list, err := p.List(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, in := range list {
		got = append(got, in.ID)
		if !in.HasLabels(labels) || in.Labels[aws.TagGroup] != "mayfly" {
			t.Errorf("instance %s labels %v", in.ID, in.Labels)
		}
	}
	if !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(ids))) {
		t.Errorf("List = %v, want %v", got, ids)
	}
	if calls := e.srv.Calls()["DescribeInstances"]; calls != 3 {
		t.Errorf("DescribeInstances calls = %d, want 3 pages of 5", calls)
	}
	reqs := e.srv.Requests()
	if len(reqs) < 2 || reqs[1].Get("NextToken") == "" || reqs[0].Get("MaxResults") != "5" {
		t.Errorf("paging requests: %v", reqs)
	}
}

func TestSpotInterruptionInList(t *testing.T) {
	e := newEnv(t, awsfake.Options{ShuttingDownDuration: time.Hour})
	p := start(t, e.with("spot", true, "spot_max_price", "0.02"))
	ids, err := p.Create(ctxT(t), 3, labels)
	if err != nil {
		t.Fatal(err)
	}
	if in, _ := e.srv.Instance(ids[0]); !in.Spot || in.SpotMaxPrice != "0.02" {
		t.Errorf("instance spot=%t max price %q", in.Spot, in.SpotMaxPrice)
	}
	waitRunning(t, p, ids)
	if err := e.srv.InterruptSpot(ids[0], false); err != nil {
		t.Fatal(err)
	}
	if err := e.srv.InterruptSpot(ids[1], true); err != nil {
		t.Fatal(err)
	}
	list, err := p.List(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]providers.Instance{}
	for _, in := range list {
		got[in.ID] = in
	}
	for _, id := range ids[:2] {
		if in := got[id]; in.State != providers.StateGone || in.Reason != aws.ReasonSpotInterrupted {
			t.Errorf("interrupted %s listed %s (%q), want gone (spot-interrupted)", id, in.State, in.Reason)
		}
	}
	if in := got[ids[2]]; in.State != providers.StateRunning {
		t.Errorf("uninterrupted %s listed %s", ids[2], in.State)
	}
	if err := p.Heartbeat(ctxT(t), ids[0]); !providers.IsNotFound(err) {
		t.Errorf("Heartbeat of an interrupted instance = %v, want not found", err)
	}
}
