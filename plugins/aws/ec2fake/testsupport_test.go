package ec2fake_test

import (
	"encoding/base64"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"

	"github.com/mayfly-ci/mayfly/plugins/aws/ec2fake"
)

// TestLocalInstanceOptions checks the options that let a local server play
// the instances: a fixed address, a fixed published host key, and the
// launch hook seeing each new instance (with its user data) exactly once,
// before RunInstances answers.
func TestLocalInstanceOptions(t *testing.T) {
	const hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeAcxcZBdVbpJadXlwY0UpdyPXHvWq5yLxRiY1g8r5p"
	var (
		mu       sync.Mutex
		launched []ec2fake.Instance
	)
	srv, c, _ := newServer(t, ec2fake.Options{
		Address: "127.0.0.1",
		HostKey: hostKey,
		OnLaunch: func(in ec2fake.Instance) {
			mu.Lock()
			launched = append(launched, in)
			mu.Unlock()
		},
	})
	userData := base64.StdEncoding.EncodeToString([]byte("#cloud-config\n"))
	out := run(t, c, &ec2.RunInstancesInput{MinCount: aws.Int32(2), MaxCount: aws.Int32(2), UserData: aws.String(userData), ClientToken: aws.String("tok-1")})
	mu.Lock()
	got := len(launched)
	mu.Unlock()
	if got != 2 {
		t.Fatalf("OnLaunch saw %d instances before RunInstances answered, want 2", got)
	}
	for i, in := range out.Instances {
		id := aws.ToString(in.InstanceId)
		if launched[i].ID != id || string(launched[i].UserData) != "#cloud-config\n" {
			t.Errorf("OnLaunch[%d] = %s with user data %q, want %s with the request's", i, launched[i].ID, launched[i].UserData, id)
		}
		if ip := aws.ToString(in.PrivateIpAddress); ip != "127.0.0.1" {
			t.Errorf("%s private IP = %q, want 127.0.0.1", id, ip)
		}
		if ip := aws.ToString(in.PublicIpAddress); ip != "127.0.0.1" {
			t.Errorf("%s public IP = %q, want 127.0.0.1", id, ip)
		}
		co, err := c.GetConsoleOutput(ctx(t), &ec2.GetConsoleOutputInput{InstanceId: aws.String(id)})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := base64.StdEncoding.DecodeString(aws.ToString(co.Output))
		if !strings.Contains(string(b), "-----BEGIN SSH HOST KEY KEYS-----\r\n"+hostKey+" root@") {
			t.Errorf("%s console lacks the configured host key:\n%s", id, b)
		}
	}
	// A retry with the same client token launches nothing new.
	run(t, c, &ec2.RunInstancesInput{MinCount: aws.Int32(2), MaxCount: aws.Int32(2), UserData: aws.String(userData), ClientToken: aws.String("tok-1")})
	mu.Lock()
	got = len(launched)
	mu.Unlock()
	if got != 2 || len(srv.Instances()) != 2 {
		t.Errorf("after an idempotent retry: OnLaunch calls %d, instances %d; want 2 and 2", got, len(srv.Instances()))
	}
}
