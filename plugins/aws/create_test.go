package aws_test

import (
	"encoding/base64"
	"slices"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
	"github.com/mayfly-ci/mayfly/providers"
)

func TestSubnetFallback(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("subnet_ids", []string{subA, subB, subC}, "create_concurrency", 1))
	e.srv.SetCapacity(subA, 0)
	ids, err := p.Create(ctxT(t), 3, labels)
	if err != nil || len(ids) != 3 {
		t.Fatalf("Create(3) = %v, %v", ids, err)
	}
	for _, id := range ids {
		if in, _ := e.srv.Instance(id); in.SubnetID != subB {
			t.Errorf("instance %s in %s, want %s (first subnet with capacity)", id, in.SubnetID, subB)
		}
	}
	// subnet A failed once; it is then tried last, so 3 launches cost 4 calls.
	if got := e.srv.Calls()["RunInstances"]; got != 4 {
		t.Errorf("RunInstances calls = %d, want 4 (1 refused in %s, 3 in %s)", got, subA, subB)
	}

	e.srv.SetCapacity(subB, 0)
	ids, err = p.Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatalf("Create with A and B full: %v", err)
	}
	if in, _ := e.srv.Instance(ids[0]); in.SubnetID != subC {
		t.Errorf("instance in %s, want %s", in.SubnetID, subC)
	}

	e.srv.SetCapacity(subC, 0)
	e.srv.ResetCalls()
	ids, err = p.Create(ctxT(t), 2, labels)
	scope, ok := providers.IsCapacityExhausted(err)
	if len(ids) != 0 || !ok || scope != "us-east-1" {
		t.Fatalf("Create with no capacity anywhere = %v, %v; want capacity_exhausted in us-east-1", ids, err)
	}
	for _, s := range []string{subA, subB, subC} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name subnet %s", err, s)
		}
	}
	if got := e.srv.Calls()["RunInstances"]; got != 3 {
		t.Errorf("RunInstances calls = %d, want 3 (one per subnet, then stop)", got)
	}
}

func TestQuota(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("create_concurrency", 1))
	e.srv.SetInstanceLimit(2)
	ids, err := p.Create(ctxT(t), 3, labels)
	if scope, ok := providers.IsQuotaExceeded(err); !ok || scope != "us-east-1" || len(ids) != 2 {
		t.Fatalf("Create(3) under a limit of 2 = %v, %v; want 2 ids and quota_exceeded in us-east-1", ids, err)
	}
	if !strings.Contains(err.Error(), "InstanceLimitExceeded") {
		t.Errorf("error %q does not carry the EC2 code", err)
	}
	// A quota error is not a capacity error: no fallback to subnet B.
	if got := e.srv.Calls()["RunInstances"]; got != 3 {
		t.Errorf("RunInstances calls = %d, want 3", got)
	}
}

func TestCreateRefusesUnlabelled(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with("manager", "mgr-1"))
	for _, l := range []map[string]string{
		{providers.LabelRunner: "x"},
		{providers.LabelManager: "someone-else"},
		{providers.LabelManager: "mgr-1", "Name": "mine"},
		{providers.LabelManager: "mgr-1", "aws:owner": "x"},
	} {
		if _, err := p.Create(ctxT(t), 1, l); providers.KindOf(err) != providers.KindInvalidArgument {
			t.Errorf("Create with labels %v = %v, want invalid_argument", l, err)
		}
	}
	if got := e.srv.Calls()["RunInstances"]; got != 0 {
		t.Errorf("refused creates made %d RunInstances calls", got)
	}
}

func TestUserDataDecodes(t *testing.T) {
	e := newEnv(t, awsfake.Options{})
	p := start(t, e.with())
	ids, err := p.Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatal(err)
	}
	reqs := e.srv.Requests()
	ud, err := base64.StdEncoding.DecodeString(reqs[len(reqs)-1].Get("UserData"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(ud), "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 ") {
		t.Errorf("user data without user_data setting:\n%s", ud)
	}
	in, _ := e.srv.Instance(ids[0])
	if in.Tags["Name"] == "" || in.Tags[aws.TagKeyID] == "" || in.Tags[providers.LabelManager] != "mgr-1" {
		t.Errorf("tags = %v", in.Tags)
	}
	if got := reqs[len(reqs)-1].Get("TagSpecification.2.ResourceType"); got != "volume" {
		t.Errorf("second tag specification is for %q, want volume", got)
	}
}

func TestLaunchTemplateAndOptions(t *testing.T) {
	e := newEnv(t, awsfake.Options{LaunchTemplates: []awsfake.LaunchTemplate{
		{ID: "lt-0123456789abcdef0", Name: "runners", ImageID: ami, InstanceType: "c6i.large"},
	}})
	delete(e.settings, "ami")
	delete(e.settings, "instance_type")
	p := start(t, e.with(
		"launch_template", map[string]any{"name": "runners", "version": "$Latest"},
		"security_group_ids", []string{"sg-0123456789abcdef0"},
		"iam_instance_profile", "arn:aws:iam::123456789012:instance-profile/runner",
	))
	ids, err := p.Create(ctxT(t), 1, labels)
	if err != nil {
		t.Fatal(err)
	}
	in, _ := e.srv.Instance(ids[0])
	if in.ImageID != ami || in.InstanceType != "c6i.large" {
		t.Errorf("instance from template: image %s type %s", in.ImageID, in.InstanceType)
	}
	if !slices.Equal(in.SecurityGroups, []string{"sg-0123456789abcdef0"}) || in.IAMProfile != "arn:aws:iam::123456789012:instance-profile/runner" {
		t.Errorf("security groups %v, profile %q", in.SecurityGroups, in.IAMProfile)
	}
	req := e.srv.Requests()[0]
	if req.Get("LaunchTemplate.LaunchTemplateName") != "runners" || req.Get("LaunchTemplate.Version") != "$Latest" {
		t.Errorf("launch template parameters: %v", req)
	}
	missing := start(t, e.with("launch_template", map[string]any{"name": "gone"}))
	if _, err := missing.Create(ctxT(t), 1, labels); providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("Create with an unknown template = %v, want invalid_argument", err)
	}
}
