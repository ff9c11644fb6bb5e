package gce_test

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/gce"
	"github.com/mayfly-ci/mayfly/plugins/gce/gcefake"
	"github.com/mayfly-ci/mayfly/providers"
)

func createOne(t *testing.T, p providers.Provider, labels map[string]string) string {
	t.Helper()
	ids, err := p.Create(ctx(t), 1, labels)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if len(ids) != 1 {
		t.Fatalf("Create returned %q", ids)
	}
	return ids[0]
}

// TestInsertRequest checks the instance the fake received: machine type,
// image, disk, network, scheduling, labels and metadata.
func TestInsertRequest(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, map[string]any{
		"machine_type": "n2-standard-4", "image_family": "ubuntu-2404-lts-amd64", "image_project": "ubuntu-os-cloud",
		"disk_size_gb": 50, "disk_type": "pd-ssd", "network": "ci", "subnetwork": "runners",
		"network_tags": []string{"mayfly-vm"}, "service_account": "vm@mayfly-test.iam.gserviceaccount.com",
		"spot": true, "no_external_ip": true, "name_prefix": "ci", "username": "runner",
		"startup_script": "#!/bin/sh\necho ready > /run/ready\n",
	}))
	id := createOne(t, p, testLabels)
	zone, name, _ := strings.Cut(id, "/")
	if zone != "us-east1-b" || !strings.HasPrefix(name, "ci-") {
		t.Errorf("id %q, want us-east1-b/ci-...", id)
	}
	insts := f.Instances()
	if len(insts) != 1 {
		t.Fatalf("fake holds %d instances", len(insts))
	}
	in := insts[0]
	res := in.Resource
	if !strings.HasSuffix(res.GetMachineType(), "/zones/us-east1-b/machineTypes/n2-standard-4") {
		t.Errorf("machine type %q", res.GetMachineType())
	}
	if d := res.GetDisks(); len(d) != 1 || !d[0].GetBoot() || !d[0].GetAutoDelete() {
		t.Errorf("disks %v: want one auto-deleted boot disk", d)
	}
	nic := res.GetNetworkInterfaces()[0]
	if !strings.HasSuffix(nic.GetNetwork(), "global/networks/ci") || nic.GetSubnetwork() != "regions/us-east1/subnetworks/runners" {
		t.Errorf("network %q subnetwork %q", nic.GetNetwork(), nic.GetSubnetwork())
	}
	if len(nic.GetAccessConfigs()) != 0 {
		t.Errorf("no_external_ip but access configs %v", nic.GetAccessConfigs())
	}
	sc := res.GetScheduling()
	if sc.GetProvisioningModel() != "SPOT" || sc.GetOnHostMaintenance() != "TERMINATE" || sc.GetAutomaticRestart() {
		t.Errorf("scheduling %v", sc)
	}
	if tags := res.GetTags().GetItems(); !slices.Equal(tags, []string{"mayfly-vm"}) {
		t.Errorf("tags %v", tags)
	}
	if sa := res.GetServiceAccounts(); len(sa) != 1 || sa[0].GetEmail() != "vm@mayfly-test.iam.gserviceaccount.com" ||
		!slices.Equal(sa[0].GetScopes(), []string{"https://www.googleapis.com/auth/cloud-platform"}) {
		t.Errorf("service accounts %v", sa)
	}
	if !maps.Equal(in.Labels, testLabels) {
		t.Errorf("GCE labels %v, want %v", in.Labels, testLabels)
	}
	md := in.Metadata
	if md["startup-script"] != "#!/bin/sh\necho ready > /run/ready\n" {
		t.Errorf("startup-script %q", md["startup-script"])
	}
	if md["enable-guest-attributes"] != "TRUE" || md["block-project-ssh-keys"] != "TRUE" || md["enable-oslogin"] != "FALSE" {
		t.Errorf("metadata %v", md)
	}
	// ssh-keys: "runner:ssh-ed25519 AAAA... runner", matching ConnectInfo's key.
	user, rest, _ := strings.Cut(md["ssh-keys"], ":")
	pub, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(rest))
	if err != nil || user != "runner" || comment != "runner" || pub.Type() != ssh.KeyAlgoED25519 {
		t.Fatalf("ssh-keys %q: user %q comment %q err %v", md["ssh-keys"], user, comment, err)
	}
	waitState(t, p, id, providers.StateRunning)
	ci, err := p.ConnectInfo(ctx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(ci.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if string(signer.PublicKey().Marshal()) != string(pub.Marshal()) {
		t.Error("ConnectInfo key does not match the ssh-keys metadata")
	}
	if ci.Username != "runner" || ci.Port != 22 || ci.Protocol != providers.ProtocolSSH || !strings.HasPrefix(ci.Address, "10.128.") {
		t.Errorf("connect info %+v: want runner@10.128.x.x:22 over ssh (internal IP)", ci)
	}
}

// TestZoneFallback: a zone out of capacity is skipped for the next zone,
// and, cooling down, is not tried first again.
func TestZoneFallback(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, map[string]any{"zones": []string{"us-east1-b", "us-east1-c", "us-east1-d"}}))
	f.ExhaustZone("us-east1-b", -1)
	f.ExhaustZone("us-east1-c", -1)

	id := createOne(t, p, testLabels)
	if !strings.HasPrefix(id, "us-east1-d/") {
		t.Fatalf("instance %s, want it in us-east1-d", id)
	}
	insertsIn := func(zone string) int {
		n := 0
		for _, r := range f.Requests() {
			if r.Method == "instances.insert" && r.Zone == zone {
				n++
			}
		}
		return n
	}
	if b, c := insertsIn("us-east1-b"), insertsIn("us-east1-c"); b != 1 || c != 1 {
		t.Errorf("inserts in b, c = %d, %d; want 1, 1", b, c)
	}
	id2 := createOne(t, p, testLabels)
	if !strings.HasPrefix(id2, "us-east1-d/") || insertsIn("us-east1-b") != 1 || insertsIn("us-east1-c") != 1 {
		t.Errorf("second create: %s; inserts in b, c = %d, %d: exhausted zones were tried again", id2, insertsIn("us-east1-b"), insertsIn("us-east1-c"))
	}

	// All zones out: a capacity error naming every zone, and no instance.
	f.ExhaustZone("us-east1-d", -1)
	ids, err := p.Create(ctx(t), 1, testLabels)
	scope, ok := providers.IsCapacityExhausted(err)
	if !ok || len(ids) != 0 {
		t.Fatalf("Create with every zone exhausted = %q, %v; want a capacity error", ids, err)
	}
	if want := "us-east1-d,us-east1-b,us-east1-c"; scope != want {
		t.Errorf("scope %q, want %q", scope, want)
	}
	if n := len(f.Instances()); n != 2 {
		t.Errorf("fake holds %d instances, want 2", n)
	}
}

// TestErrorKindsThroughTheSDK checks classification of real SDK errors
// produced by the fake's JSON, for every call.
func TestErrorKindsThroughTheSDK(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, nil))
	id := createOne(t, p, testLabels)
	var leftover []string

	tests := []struct {
		name  string
		fault gcefake.Fault
		call  func() error
		kind  providers.Kind
	}{
		{"delete 403 rateLimitExceeded", gcefake.Fault{Method: "instances.delete", Status: 403, Reason: "rateLimitExceeded"},
			func() error { _, err := p.Delete(ctx(t), []string{id}); return err }, providers.KindRateLimited},
		{"delete 500", gcefake.Fault{Method: "instances.delete", Status: 500},
			func() error { _, err := p.Delete(ctx(t), []string{id}); return err }, providers.KindTransient},
		{"get 429", gcefake.Fault{Method: "instances.get", Status: 429, RetryAfter: "0"},
			func() error { return p.Heartbeat(ctx(t), id) }, providers.KindRateLimited},
		{"insert 403 forbidden", gcefake.Fault{Method: "instances.insert", Status: 403, Reason: "forbidden"},
			func() error { _, err := p.Create(ctx(t), 1, testLabels); return err }, providers.KindPermanent},
		{"wait 503", gcefake.Fault{Method: "zoneOperations.wait", Status: 503},
			func() error {
				ids, err := p.Create(ctx(t), 1, testLabels)
				if len(ids) != 1 {
					t.Errorf("Create with a failed wait returned %q; want the id of the accepted insert", ids)
				}
				leftover = ids
				return err
			}, providers.KindTransient},
	}
	for _, tt := range tests {
		f.FailNext(tt.fault)
		err := tt.call()
		if k := providers.KindOf(err); k != tt.kind {
			t.Errorf("%s: kind %s, want %s (%v)", tt.name, k, tt.kind, err)
		}
	}
	// Ids never issued (no zone) are confirmed without a call.
	all := append(leftover, id, "not-an-id")
	if got, err := p.Delete(ctx(t), all); err != nil || len(got) != len(all) {
		t.Fatalf("Delete(%q) = %q, %v", all, got, err)
	}
	waitGone(t, f, 0)
	// Delete of an instance that is gone is a success.
	got, err := p.Delete(ctx(t), []string{id})
	if err != nil || !slices.Equal(got, []string{id}) {
		t.Errorf("Delete of a deleted instance = %q, %v; want it confirmed", got, err)
	}
	if err := p.Heartbeat(ctx(t), id); !providers.IsNotFound(err) {
		t.Errorf("Heartbeat of a deleted instance: %v, want not found", err)
	}
}

func waitGone(t *testing.T, f *gcefake.Server, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(f.Instances()) != want {
		if time.Now().After(deadline) {
			t.Fatalf("fake holds %d instances, want %d", len(f.Instances()), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestLimiterSlowsDown: after a 429 with Retry-After: 1 the plugin sends
// nothing for a second and says so in the error it returns; with the
// configured rate, a burst of calls is spread out.
func TestLimiterSlowsDown(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, map[string]any{"rate_limit": map[string]any{"rate": 25, "burst": 1}}))
	f.FailNext(gcefake.Fault{Method: "instances.aggregatedList", Status: 429, Reason: "rateLimitExceeded", RetryAfter: "1"})
	_, err := p.List(ctx(t))
	if ra, ok := providers.IsRateLimited(err); !ok || ra != time.Second {
		t.Fatalf("List = %v, want rate limited with retry after 1s", err)
	}
	st := p.Stats()
	if st.Throttled != 1 || st.Rate != 25 || st.PauseLeft <= 0 {
		t.Errorf("stats after 429: %+v; want 1 throttled, rate 25/s, a pause", st)
	}
	if _, err := p.List(ctx(t)); err != nil {
		t.Fatalf("List after the pause: %v", err)
	}
	reqs := f.Requests()
	if len(reqs) != 2 {
		t.Fatalf("fake saw %d requests, want 2", len(reqs))
	}
	if gap := reqs[1].Time.Sub(reqs[0].Time); gap < 950*time.Millisecond {
		t.Errorf("second request %s after the 429, want >= 1s (Retry-After)", gap)
	}
	t.Logf("gap after 429 with Retry-After: 1 = %s", reqs[1].Time.Sub(reqs[0].Time))

	// 10 calls at 25/s with burst 1 take at least 9/25 s.
	f.ResetCalls()
	start := time.Now()
	for range 10 {
		if _, err := p.List(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	reqs = f.Requests()
	spread := reqs[len(reqs)-1].Time.Sub(reqs[0].Time)
	t.Logf("10 List calls spread over %s (elapsed %s)", spread, time.Since(start))
	if spread < 300*time.Millisecond {
		t.Errorf("10 calls within %s: the limiter did not hold them to ~25/s", spread)
	}
}

// TestListPaging: List follows nextPageToken until the end, with a small
// page size, and filters on the manager label.
func TestListPaging(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, map[string]any{"list_page_size": 2, "zones": []string{"us-east1-b", "us-east1-c"}}))
	other := newProvider(t, settings(t, url, map[string]any{"zones": []string{"us-east1-c"}}))
	var mine []string
	for range 5 {
		mine = append(mine, createOne(t, p, testLabels))
	}
	f.ExhaustZone("us-east1-b", 2) // two land in the second zone
	mine = append(mine, createOne(t, p, testLabels), createOne(t, p, testLabels))
	// Not mayfly's: no manager label, so not listed.
	otherLabels := map[string]string{providers.LabelManager: "mgr-2"}
	theirs := createOne(t, other, otherLabels)
	f.ResetCalls()

	list, err := p.List(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, in := range list {
		got = append(got, in.ID)
	}
	want := slices.Sorted(slices.Values(append(slices.Clone(mine), theirs)))
	if !slices.Equal(got, want) {
		t.Errorf("List = %q, want %q", got, want)
	}
	if n := f.Calls()["instances.aggregatedList"]; n != 4 {
		t.Errorf("%d aggregatedList pages for 8 instances at 2 per page, want 4", n)
	}

	// With settings manager, only that manager's instances.
	scoped := newProvider(t, settings(t, url, map[string]any{"manager": "mgr-2", "list_page_size": 3}))
	list, err = scoped.List(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != theirs {
		t.Errorf("List with manager mgr-2 = %+v, want only %s", list, theirs)
	}
	if _, err := scoped.Create(ctx(t), 1, testLabels); providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("Create with another manager's label: %v, want invalid_argument", err)
	}
	if _, err := p.Create(ctx(t), 1, map[string]string{providers.LabelRunner: "r"}); providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("Create without manager label: %v, want invalid_argument", err)
	}

	// An unreachable zone fails the whole List.
	f.SetUnreachable("us-east1-c", true)
	if _, err := p.List(ctx(t)); !providers.IsTransient(err) || !strings.Contains(err.Error(), "unreachable") {
		t.Errorf("List with an unreachable zone: %v, want a transient error", err)
	}
}

// TestLabelsRoundTrip: labels GCE cannot hold are mapped for GCE and come
// back from List as given.
func TestLabelsRoundTrip(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, nil))
	labels := map[string]string{
		providers.LabelManager: "Runner-Manager.example.com",
		providers.LabelRunner:  "Docker Runner #1 (Linux, small)",
		"Team":                 "CI/CD",
	}
	id := createOne(t, p, labels)
	gl := f.Instances()[0].Labels
	for k, v := range labels {
		if gv, ok := gl[gce.LabelKey(k)]; !ok || gv != gce.LabelValue(v) {
			t.Errorf("GCE label for %s=%q: %q, want %q", k, v, gv, gce.LabelValue(v))
		}
	}
	list, err := p.List(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != id || !maps.Equal(list[0].Labels, labels) {
		t.Errorf("List = %+v, want %s with labels %v", list, id, labels)
	}
}

// TestHostKeyFromGuestAttributes: no host key before the guest agent
// publishes it, then the one it published.
func TestHostKeyFromGuestAttributes(t *testing.T) {
	f, url := startFake(t, gcefake.Options{AgentDelay: 300 * time.Millisecond})
	p := newProvider(t, settings(t, url, nil))
	id := createOne(t, p, testLabels)
	zone, name, _ := strings.Cut(id, "/")
	ci, err := p.ConnectInfo(ctx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	if ci.HostKey != "" {
		t.Errorf("host key %q before the agent published one", ci.HostKey)
	}
	if err := ci.Validate(); err != nil {
		t.Error(err)
	}
	if !strings.HasPrefix(ci.Address, "203.0.113.") {
		t.Errorf("address %q, want the external IP", ci.Address)
	}
	deadline := time.Now().Add(5 * time.Second)
	for f.HostKey(zone, name, ssh.KeyAlgoED25519) == "" {
		if time.Now().After(deadline) {
			t.Fatal("agent never published host keys")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ci, err = p.ConnectInfo(ctx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	if want := f.HostKey(zone, name, ssh.KeyAlgoED25519); ci.HostKey != want {
		t.Errorf("host key %q, want the published ed25519 key %q", ci.HostKey, want)
	}
	before := f.Calls()["instances.getGuestAttributes"]
	if _, err := p.ConnectInfo(ctx(t), id); err != nil {
		t.Fatal(err)
	}
	if after := f.Calls()["instances.getGuestAttributes"]; after != before {
		t.Errorf("host key read again (%d -> %d calls) after it was known", before, after)
	}
}

// TestPreemptionVisibleInList: a preempted spot instance is failed with
// reason "preempted", and its heartbeat fails.
func TestPreemptionVisibleInList(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, map[string]any{"spot": true}))
	id := createOne(t, p, testLabels)
	waitState(t, p, id, providers.StateRunning)
	zone, name, _ := strings.Cut(id, "/")
	if err := f.Preempt(zone, name); err != nil {
		t.Fatal(err)
	}
	in := waitState(t, p, id, providers.StateFailed)
	if in.Reason != "preempted" {
		t.Errorf("reason %q, want preempted", in.Reason)
	}
	if err := p.Heartbeat(ctx(t), id); err == nil || !providers.IsPermanent(err) {
		t.Errorf("Heartbeat of a preempted instance: %v, want a permanent error", err)
	}
	if _, err := p.Delete(ctx(t), []string{id}); err != nil {
		t.Fatal(err)
	}
	waitGone(t, f, 0)
}

// TestPreemptionPhases follows a preemption through List as GCE plays it:
// the instance is failed ("preempted") while STOPPING and once
// TERMINATED, its heartbeat fails for good, and the fleet's Delete
// removes it.
func TestPreemptionPhases(t *testing.T) {
	tests := []struct {
		name     string
		settings map[string]any
		delay    time.Duration // PreemptDelay: how long it stays STOPPING
	}{
		{"spot stopping", map[string]any{"spot": true}, time.Hour},
		{"spot stopping then terminated", map[string]any{"spot": true}, 400 * time.Millisecond},
		{"preemptible terminated at once", map[string]any{"preemptible": true}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, url := startFake(t, gcefake.Options{PreemptDelay: tt.delay, DeleteDelay: 200 * time.Millisecond})
			p := newProvider(t, settings(t, url, tt.settings))
			id := createOne(t, p, testLabels)
			other := createOne(t, p, testLabels)
			waitState(t, p, id, providers.StateRunning)
			zone, name, _ := strings.Cut(id, "/")
			if err := f.Preempt(zone, name); err != nil {
				t.Fatal(err)
			}
			wantStatus := "STOPPING"
			if tt.delay == 0 {
				wantStatus = "TERMINATED"
			}
			for phase := range 2 {
				if got := fakeStatus(f, name); got != wantStatus {
					t.Fatalf("phase %d: fake status %q, want %s", phase, got, wantStatus)
				}
				in := waitState(t, p, id, providers.StateFailed)
				if in.Reason != "preempted" {
					t.Errorf("%s: reason %q, want preempted", wantStatus, in.Reason)
				}
				if err := p.Heartbeat(ctx(t), id); err == nil || !providers.IsPermanent(err) {
					t.Errorf("%s: Heartbeat: %v, want a permanent error", wantStatus, err)
				}
				if tt.delay == 0 || tt.delay == time.Hour {
					break
				}
				time.Sleep(tt.delay)
				wantStatus = "TERMINATED"
			}
			waitState(t, p, other, providers.StateRunning)
			if _, err := p.Delete(ctx(t), []string{id}); err != nil {
				t.Fatal(err)
			}
			waitState(t, p, id, providers.StateDeleting)
			waitGone(t, f, 1)
			if got := fakeStatus(f, name); got != "" {
				t.Errorf("preempted instance still at the fake: %s", got)
			}
		})
	}
}

// fakeStatus returns the status of instance name at the fake, "" if none.
func fakeStatus(f *gcefake.Server, name string) string {
	for _, in := range f.Instances() {
		if in.Name == name {
			return in.Status
		}
	}
	return ""
}

// TestSlowOperation: an operation longer than one zoneOperations.wait is
// waited for with further waits; one longer than operation_timeout makes
// Create fail with a transient error but still return the id, since the
// instance may exist.
func TestSlowOperation(t *testing.T) {
	f, url := startFake(t, gcefake.Options{OperationDelay: 500 * time.Millisecond, MaxWait: 120 * time.Millisecond})
	p := newProvider(t, settings(t, url, nil))
	id := createOne(t, p, testLabels)
	if n := f.Calls()["zoneOperations.wait"]; n < 4 {
		t.Errorf("%d waits for a 500ms operation at 120ms per wait, want >= 4", n)
	}
	impatient := newProvider(t, settings(t, url, map[string]any{"operation_timeout": "200ms"}))
	ids, err := impatient.Create(ctx(t), 1, testLabels)
	if !providers.IsTransient(err) || len(ids) != 1 {
		t.Fatalf("Create with a too slow operation = %q, %v; want the id and a transient error", ids, err)
	}
	waitState(t, p, ids[0], providers.StateRunning)
	if _, err := p.Delete(ctx(t), []string{id, ids[0]}); err != nil {
		t.Fatal(err)
	}
}

// TestSSHKeyReinstalledAfterRestart: a provider that did not create the
// instance (a restarted plugin) installs a new key with setMetadata.
func TestSSHKeyReinstalledAfterRestart(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	raw := settings(t, url, map[string]any{"username": "ci"})
	first := newProvider(t, raw)
	id := createOne(t, first, testLabels)
	old := f.Instances()[0].Metadata["ssh-keys"]

	second := newProvider(t, raw)
	ci, err := second.ConnectInfo(ctx(t), id)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(ci.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	now := f.Instances()[0].Metadata["ssh-keys"]
	want := "ci:" + strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey()))) + " ci"
	if now == old || now != want {
		t.Errorf("ssh-keys after restart %q, want only the new key %q", now, want)
	}
	if n := f.Calls()["instances.setMetadata"]; n != 1 {
		t.Errorf("%d setMetadata calls, want 1", n)
	}
}

// TestLeakFreeAfterPluginRestart kills the plugin process, lets the host
// restart it, and deletes everything found by label.
func TestLeakFreeAfterPluginRestart(t *testing.T) {
	f, url := startFake(t, gcefake.Options{DeleteDelay: 50 * time.Millisecond})
	p := startPlugin(t)
	if _, err := p.Init(ctx(t), settings(t, url, nil)); err != nil {
		t.Fatal(err)
	}
	ids, err := p.Create(ctx(t), 3, testLabels)
	if err != nil || len(ids) != 3 {
		t.Fatalf("Create(3) = %q, %v", ids, err)
	}
	pid := p.PID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for p.Restarts() == 0 || p.PID() == pid {
		if time.Now().After(deadline) {
			t.Fatal("plugin was not restarted")
		}
		time.Sleep(20 * time.Millisecond)
	}
	list, err := p.List(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, in := range list {
		if in.HasLabels(testLabels) {
			found = append(found, in.ID)
		}
	}
	if !slices.Equal(found, ids) {
		t.Fatalf("after restart List found %q, want %q", found, ids)
	}
	deleted, err := p.Delete(ctx(t), found)
	if err != nil || !slices.Equal(deleted, ids) {
		t.Fatalf("Delete = %q, %v", deleted, err)
	}
	waitGone(t, f, 0)
	if list, err := p.List(ctx(t)); err != nil || len(list) != 0 {
		t.Errorf("List after deleting everything = %+v, %v", list, err)
	}
}

// TestAPICallsPerInstance counts the API requests of one instance's life:
// create, wait until running (List is fleet-wide, not per instance),
// ConnectInfo, delete.
func TestAPICallsPerInstance(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, nil))
	id := createOne(t, p, testLabels)
	created := f.Calls()
	waitState(t, p, id, providers.StateRunning) // fills the address cache
	f.ResetCalls()
	if _, err := p.ConnectInfo(ctx(t), id); err != nil {
		t.Fatal(err)
	}
	connect := f.Calls()
	f.ResetCalls()
	if _, err := p.Delete(ctx(t), []string{id}); err != nil {
		t.Fatal(err)
	}
	deleted := f.Calls()
	t.Logf("per instance: create %v, connect %v, delete %v", created, connect, deleted)
	if !maps.Equal(created, map[string]int{"instances.insert": 1, "zoneOperations.wait": 1}) {
		t.Errorf("create calls %v, want 1 insert + 1 wait", created)
	}
	if !maps.Equal(connect, map[string]int{"instances.getGuestAttributes": 1}) {
		t.Errorf("connect calls %v, want 1 getGuestAttributes", connect)
	}
	if !maps.Equal(deleted, map[string]int{"instances.delete": 1}) {
		t.Errorf("delete calls %v, want 1 delete", deleted)
	}
	total := 0
	for _, m := range []map[string]int{created, connect, deleted} {
		for _, n := range m {
			total += n
		}
	}
	t.Logf("API calls per created+connected+deleted instance: %d (floor 2)", total)
	if p.Stats().Calls["instances.insert"] != 1 {
		t.Errorf("plugin counted %v", p.Stats().Calls)
	}
}

// TestClosed: calls after Shutdown fail with ErrClosed.
func TestClosed(t *testing.T) {
	_, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, nil))
	if err := p.Shutdown(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.List(ctx(t)); !errors.Is(err, providers.ErrClosed) {
		t.Errorf("List after Shutdown: %v", err)
	}
}

// TestCreatePartialQuota: with room for two, Create(3) returns the two
// ids it made together with a quota error.
func TestCreatePartialQuota(t *testing.T) {
	f, url := startFake(t, gcefake.Options{})
	p := newProvider(t, settings(t, url, nil))
	f.SetQuota("us-east1", 2)
	ids, err := p.Create(ctx(t), 3, testLabels)
	scope, ok := providers.IsQuotaExceeded(err)
	if len(ids) != 2 || !ok || scope != "us-east1" {
		t.Fatalf("Create(3) with quota 2 = %q, %v; want 2 ids and a quota error in us-east1", ids, err)
	}
	if n := len(f.Instances()); n != 2 {
		t.Errorf("fake holds %d instances", n)
	}
}
