package awsfake_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
)

const (
	akid   = "AKIDFAKE0000000000"
	secret = "fake-secret-key/0123456789"
	ami    = "ami-0123456789abcdef0"
	winAMI = "ami-0aaaaaaaaaaaaaaa1"
	subA   = "subnet-0aaaaaaaaaaaaaaaa"
	subB   = "subnet-0bbbbbbbbbbbbbbbb"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newServer(t *testing.T, opts awsfake.Options) (*awsfake.Server, *ec2.Client, *clock) {
	t.Helper()
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	if opts.Now == nil {
		opts.Now = clk.Now
	}
	opts.AccessKeyID, opts.SecretAccessKey = akid, secret
	if opts.Subnets == nil {
		opts.Subnets = map[string]string{subA: "us-east-1a", subB: "us-east-1b"}
	}
	if opts.Images == nil {
		opts.Images = map[string]string{ami: "linux", winAMI: "windows"}
	}
	srv := awsfake.New(opts)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return srv, client(hs.URL, akid, secret), clk
}

func client(endpoint, id, key string) *ec2.Client {
	return ec2.New(ec2.Options{
		Region:           "us-east-1",
		Credentials:      credentials.NewStaticCredentialsProvider(id, key, ""),
		BaseEndpoint:     aws.String(endpoint),
		RetryMaxAttempts: 1,
	})
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func run(t *testing.T, c *ec2.Client, in *ec2.RunInstancesInput) *ec2.RunInstancesOutput {
	t.Helper()
	if in.MinCount == nil {
		in.MinCount, in.MaxCount = aws.Int32(1), aws.Int32(1)
	}
	if in.ImageId == nil && in.LaunchTemplate == nil {
		in.ImageId = aws.String(ami)
	}
	out, err := c.RunInstances(ctx(t), in)
	if err != nil {
		t.Fatalf("RunInstances: %v", err)
	}
	return out
}

func tagSpec(kv ...string) []types.TagSpecification {
	var tags []types.Tag
	for i := 0; i+1 < len(kv); i += 2 {
		tags = append(tags, types.Tag{Key: aws.String(kv[i]), Value: aws.String(kv[i+1])})
	}
	return []types.TagSpecification{{ResourceType: types.ResourceTypeInstance, Tags: tags}}
}

func TestLifecycle(t *testing.T) {
	srv, c, clk := newServer(t, awsfake.Options{PendingDuration: 30 * time.Second, ShuttingDownDuration: 10 * time.Second})
	ud := base64.StdEncoding.EncodeToString([]byte("#!/bin/sh\necho hi\n"))
	out := run(t, c, &ec2.RunInstancesInput{
		InstanceType:      types.InstanceTypeT3Micro,
		SubnetId:          aws.String(subB),
		SecurityGroupIds:  []string{"sg-0123456789abcdef0"},
		UserData:          aws.String(ud),
		ClientToken:       aws.String("token-1"),
		TagSpecifications: tagSpec("mayfly-manager", "m1", "Name", "web"),
		IamInstanceProfile: &types.IamInstanceProfileSpecification{
			Name: aws.String("runner-profile"),
		},
		InstanceMarketOptions: &types.InstanceMarketOptionsRequest{
			MarketType:  types.MarketTypeSpot,
			SpotOptions: &types.SpotMarketOptions{MaxPrice: aws.String("0.05")},
		},
	})
	if len(out.Instances) != 1 {
		t.Fatalf("RunInstances returned %d instances", len(out.Instances))
	}
	in := out.Instances[0]
	id := aws.ToString(in.InstanceId)
	if !strings.HasPrefix(id, "i-") || len(id) != 19 {
		t.Errorf("instance id %q is not i- and 17 hex digits", id)
	}
	if in.State.Name != types.InstanceStateNamePending || aws.ToInt32(in.State.Code) != 0 {
		t.Errorf("new instance state = %v/%d, want pending/0", in.State.Name, aws.ToInt32(in.State.Code))
	}
	if aws.ToString(in.SubnetId) != subB || aws.ToString(in.Placement.AvailabilityZone) != "us-east-1b" {
		t.Errorf("subnet/zone = %s/%s", aws.ToString(in.SubnetId), aws.ToString(in.Placement.AvailabilityZone))
	}
	if aws.ToString(in.ClientToken) != "token-1" || in.InstanceLifecycle != types.InstanceLifecycleTypeSpot {
		t.Errorf("client token %q lifecycle %q", aws.ToString(in.ClientToken), in.InstanceLifecycle)
	}
	if in.LaunchTime == nil || !in.LaunchTime.Equal(clk.Now()) {
		t.Errorf("launch time %v, want %v", in.LaunchTime, clk.Now())
	}
	snap, _ := srv.Instance(id)
	if string(snap.UserData) != "#!/bin/sh\necho hi\n" || snap.SpotMaxPrice != "0.05" || snap.IAMProfile != "runner-profile" {
		t.Errorf("stored user data %q, max price %q, profile %q", snap.UserData, snap.SpotMaxPrice, snap.IAMProfile)
	}

	// The same client token returns the same reservation, not a new one.
	again := run(t, c, &ec2.RunInstancesInput{ClientToken: aws.String("token-1")})
	if got := aws.ToString(again.Instances[0].InstanceId); got != id {
		t.Errorf("replayed client token launched %s, want %s again", got, id)
	}

	describe := func() types.Instance {
		t.Helper()
		d, err := c.DescribeInstances(ctx(t), &ec2.DescribeInstancesInput{InstanceIds: []string{id}})
		if err != nil {
			t.Fatalf("DescribeInstances: %v", err)
		}
		if len(d.Reservations) != 1 || len(d.Reservations[0].Instances) != 1 {
			t.Fatalf("DescribeInstances(%s) = %+v", id, d.Reservations)
		}
		return d.Reservations[0].Instances[0]
	}
	if got := describe(); got.State.Name != types.InstanceStateNamePending {
		t.Errorf("state before the boot delay = %s", got.State.Name)
	}
	clk.Add(30 * time.Second)
	got := describe()
	if got.State.Name != types.InstanceStateNameRunning || aws.ToInt32(got.State.Code) != 16 {
		t.Errorf("state after the boot delay = %s", got.State.Name)
	}
	tags := map[string]string{}
	for _, tg := range got.Tags {
		tags[aws.ToString(tg.Key)] = aws.ToString(tg.Value)
	}
	if tags["mayfly-manager"] != "m1" || tags["Name"] != "web" {
		t.Errorf("tags = %v", tags)
	}
	if got.PrivateIpAddress == nil || got.Architecture != types.ArchitectureValuesX8664 {
		t.Errorf("private ip %v architecture %q", got.PrivateIpAddress, got.Architecture)
	}

	term, err := c.TerminateInstances(ctx(t), &ec2.TerminateInstancesInput{InstanceIds: []string{id}})
	if err != nil {
		t.Fatalf("TerminateInstances: %v", err)
	}
	sc := term.TerminatingInstances[0]
	if sc.PreviousState.Name != types.InstanceStateNameRunning || sc.CurrentState.Name != types.InstanceStateNameShuttingDown {
		t.Errorf("terminate: %s → %s", sc.PreviousState.Name, sc.CurrentState.Name)
	}
	clk.Add(10 * time.Second)
	got = describe()
	if got.State.Name != types.InstanceStateNameTerminated || aws.ToString(got.StateReason.Code) != "Client.UserInitiatedShutdown" {
		t.Errorf("after shutdown: %s (%v)", got.State.Name, got.StateReason)
	}
	// Terminating again succeeds; after the retention the id is unknown.
	if _, err := c.TerminateInstances(ctx(t), &ec2.TerminateInstancesInput{InstanceIds: []string{id}}); err != nil {
		t.Errorf("second TerminateInstances: %v", err)
	}
	clk.Add(time.Hour)
	_, err = c.DescribeInstances(ctx(t), &ec2.DescribeInstancesInput{InstanceIds: []string{id}})
	if code := apiCode(err); code != "InvalidInstanceID.NotFound" {
		t.Errorf("describe after retention: %v, want InvalidInstanceID.NotFound", err)
	}
	if calls := srv.Calls(); calls["RunInstances"] != 2 || calls["TerminateInstances"] != 2 || calls["DescribeInstances"] != 4 {
		t.Errorf("calls = %v", calls)
	}
}

func apiCode(err error) string {
	if apiErr, ok := errors.AsType[smithy.APIError](err); ok {
		return apiErr.ErrorCode()
	}
	return ""
}

func httpStatus(err error) int {
	if re, ok := errors.AsType[*awshttp.ResponseError](err); ok {
		return re.HTTPStatusCode()
	}
	return 0
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name   string
		setup  func(*awsfake.Server)
		call   func(*ec2.Client) error
		code   string
		status int
	}{
		{
			name:  "capacity in one subnet",
			setup: func(s *awsfake.Server) { s.SetCapacity(subA, 0) },
			call: func(c *ec2.Client) error {
				_, err := c.RunInstances(context.Background(), &ec2.RunInstancesInput{ImageId: aws.String(ami), MinCount: aws.Int32(1), MaxCount: aws.Int32(1), SubnetId: aws.String(subA)})
				return err
			},
			code: "InsufficientInstanceCapacity", status: 500,
		},
		{
			name:  "instance limit",
			setup: func(s *awsfake.Server) { s.SetInstanceLimit(1) },
			call: func(c *ec2.Client) error {
				_, err := c.RunInstances(context.Background(), &ec2.RunInstancesInput{ImageId: aws.String(ami), MinCount: aws.Int32(2), MaxCount: aws.Int32(2)})
				return err
			},
			code: "InstanceLimitExceeded", status: 400,
		},
		{
			name:  "vcpu limit",
			setup: func(s *awsfake.Server) { s.SetVcpuLimit(4) },
			call: func(c *ec2.Client) error {
				_, err := c.RunInstances(context.Background(), &ec2.RunInstancesInput{ImageId: aws.String(ami), InstanceType: types.InstanceTypeM52xlarge, MinCount: aws.Int32(1), MaxCount: aws.Int32(1)})
				return err
			},
			code: "VcpuLimitExceeded", status: 400,
		},
		{
			name:  "throttled",
			setup: func(s *awsfake.Server) { s.FailNext("DescribeInstances", "RequestLimitExceeded", "", 1) },
			call: func(c *ec2.Client) error {
				_, err := c.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{})
				return err
			},
			code: "RequestLimitExceeded", status: 503,
		},
		{
			name: "unknown instance",
			call: func(c *ec2.Client) error {
				_, err := c.TerminateInstances(context.Background(), &ec2.TerminateInstancesInput{InstanceIds: []string{"i-0123456789abcdef0"}})
				return err
			},
			code: "InvalidInstanceID.NotFound", status: 400,
		},
		{
			name: "malformed instance id",
			call: func(c *ec2.Client) error {
				_, err := c.GetConsoleOutput(context.Background(), &ec2.GetConsoleOutputInput{InstanceId: aws.String("vm-1")})
				return err
			},
			code: "InvalidInstanceID.Malformed", status: 400,
		},
		{
			name: "unknown image",
			call: func(c *ec2.Client) error {
				_, err := c.RunInstances(context.Background(), &ec2.RunInstancesInput{ImageId: aws.String("ami-0fffffffffffffff0"), MinCount: aws.Int32(1), MaxCount: aws.Int32(1)})
				return err
			},
			code: "InvalidAMIID.NotFound", status: 400,
		},
		{
			name: "unknown subnet",
			call: func(c *ec2.Client) error {
				_, err := c.RunInstances(context.Background(), &ec2.RunInstancesInput{ImageId: aws.String(ami), MinCount: aws.Int32(1), MaxCount: aws.Int32(1), SubnetId: aws.String("subnet-0ccccccccccccccc0")})
				return err
			},
			code: "InvalidSubnetID.NotFound", status: 400,
		},
		{
			name: "unknown launch template",
			call: func(c *ec2.Client) error {
				_, err := c.RunInstances(context.Background(), &ec2.RunInstancesInput{LaunchTemplate: &types.LaunchTemplateSpecification{LaunchTemplateName: aws.String("nope")}, MinCount: aws.Int32(1), MaxCount: aws.Int32(1)})
				return err
			},
			code: "InvalidLaunchTemplateName.NotFoundException", status: 400,
		},
		{
			name: "bad filter",
			call: func(c *ec2.Client) error {
				_, err := c.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{Filters: []types.Filter{{Name: aws.String("colour"), Values: []string{"red"}}}})
				return err
			},
			code: "InvalidParameterValue", status: 400,
		},
		{
			name: "max results with ids",
			call: func(c *ec2.Client) error {
				_, err := c.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{InstanceIds: []string{"i-0123456789abcdef0"}, MaxResults: aws.Int32(5)})
				return err
			},
			code: "InvalidParameterCombination", status: 400,
		},
		{
			name: "wrong credentials",
			call: func(c *ec2.Client) error {
				return nil // replaced below
			},
			code: "AuthFailure", status: 401,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, c, _ := newServer(t, awsfake.Options{})
			if tt.setup != nil {
				tt.setup(srv)
			}
			call := tt.call
			if tt.code == "AuthFailure" {
				hs := httptest.NewServer(srv)
				defer hs.Close()
				bad := client(hs.URL, akid, "not-the-secret")
				call = func(*ec2.Client) error {
					_, err := bad.DescribeInstances(context.Background(), &ec2.DescribeInstancesInput{})
					return err
				}
			}
			err := call(c)
			if code := apiCode(err); code != tt.code {
				t.Fatalf("error %v has code %q, want %q", err, code, tt.code)
			}
			if st := httpStatus(err); st != tt.status {
				t.Errorf("HTTP status %d, want %d", st, tt.status)
			}
			if apiErr, _ := errors.AsType[smithy.APIError](err); apiErr.ErrorMessage() == "" {
				t.Errorf("error %v has no message", err)
			}
		})
	}
}

func TestPartialLaunchWithinLimits(t *testing.T) {
	srv, c, _ := newServer(t, awsfake.Options{})
	srv.SetCapacity(subA, 3)
	out := run(t, c, &ec2.RunInstancesInput{MinCount: aws.Int32(1), MaxCount: aws.Int32(5), SubnetId: aws.String(subA)})
	if len(out.Instances) != 3 {
		t.Fatalf("launched %d, want the 3 the subnet had room for", len(out.Instances))
	}
	_, err := c.RunInstances(ctx(t), &ec2.RunInstancesInput{ImageId: aws.String(ami), MinCount: aws.Int32(1), MaxCount: aws.Int32(1), SubnetId: aws.String(subA)})
	if apiCode(err) != "InsufficientInstanceCapacity" || !strings.Contains(err.Error(), "us-east-1a") {
		t.Errorf("fourth launch: %v, want InsufficientInstanceCapacity naming us-east-1a", err)
	}
	run(t, c, &ec2.RunInstancesInput{SubnetId: aws.String(subB)})
}

func TestPaging(t *testing.T) {
	srv, c, _ := newServer(t, awsfake.Options{})
	for range 6 {
		run(t, c, &ec2.RunInstancesInput{MinCount: aws.Int32(2), MaxCount: aws.Int32(2), TagSpecifications: tagSpec("mayfly-manager", "m1")})
	}
	run(t, c, &ec2.RunInstancesInput{TagSpecifications: tagSpec("mayfly-manager", "other")})
	srv.ResetCalls()
	p := ec2.NewDescribeInstancesPaginator(c, &ec2.DescribeInstancesInput{
		MaxResults: aws.Int32(5),
		Filters:    []types.Filter{{Name: aws.String("tag:mayfly-manager"), Values: []string{"m1"}}},
	})
	seen := map[string]bool{}
	pages := 0
	for p.HasMorePages() {
		out, err := p.NextPage(ctx(t))
		if err != nil {
			t.Fatalf("page %d: %v", pages+1, err)
		}
		pages++
		n := 0
		for _, r := range out.Reservations {
			for _, in := range r.Instances {
				n++
				if seen[aws.ToString(in.InstanceId)] {
					t.Errorf("instance %s listed twice", aws.ToString(in.InstanceId))
				}
				seen[aws.ToString(in.InstanceId)] = true
			}
		}
		if n > 5 {
			t.Errorf("page %d has %d instances, MaxResults 5", pages, n)
		}
	}
	if len(seen) != 12 || pages != 3 {
		t.Errorf("saw %d instances in %d pages, want 12 in 3", len(seen), pages)
	}
	if got := srv.Calls()["DescribeInstances"]; got != 3 {
		t.Errorf("DescribeInstances calls = %d, want 3", got)
	}
	reqs := srv.Requests()
	if reqs[1].Get("NextToken") == "" || reqs[1].Get("Filter.1.Name") != "tag:mayfly-manager" || reqs[1].Get("Filter.1.Value.1") != "m1" {
		t.Errorf("second page request = %v", reqs[1])
	}
}

func TestFilters(t *testing.T) {
	_, c, _ := newServer(t, awsfake.Options{})
	a := run(t, c, &ec2.RunInstancesInput{TagSpecifications: tagSpec("mayfly-manager", "alpha-1", "team", "x")})
	run(t, c, &ec2.RunInstancesInput{TagSpecifications: tagSpec("mayfly-manager", "beta-1")})
	run(t, c, &ec2.RunInstancesInput{TagSpecifications: tagSpec("other", "alpha-1")})
	tests := []struct {
		filters []types.Filter
		want    int
	}{
		{[]types.Filter{{Name: aws.String("tag-key"), Values: []string{"mayfly-manager"}}}, 2},
		{[]types.Filter{{Name: aws.String("tag:mayfly-manager"), Values: []string{"alpha-*"}}}, 1},
		{[]types.Filter{{Name: aws.String("tag:mayfly-manager"), Values: []string{"alpha-?", "beta-1"}}}, 2},
		{[]types.Filter{{Name: aws.String("tag-value"), Values: []string{"alpha-1"}}}, 2},
		{[]types.Filter{{Name: aws.String("tag-value"), Values: []string{"alpha-1"}}, {Name: aws.String("tag:team"), Values: []string{"x"}}}, 1},
		{[]types.Filter{{Name: aws.String("instance-id"), Values: []string{aws.ToString(a.Instances[0].InstanceId)}}}, 1},
		{[]types.Filter{{Name: aws.String("instance-state-name"), Values: []string{"terminated"}}}, 0},
	}
	for _, tt := range tests {
		out, err := c.DescribeInstances(ctx(t), &ec2.DescribeInstancesInput{Filters: tt.filters})
		if err != nil {
			t.Fatalf("DescribeInstances: %v", err)
		}
		n := 0
		for _, r := range out.Reservations {
			n += len(r.Instances)
		}
		if n != tt.want {
			t.Errorf("filters %s: %d instances, want %d", describeFilters(tt.filters), n, tt.want)
		}
	}
}

func describeFilters(fs []types.Filter) string {
	var parts []string
	for _, f := range fs {
		parts = append(parts, aws.ToString(f.Name)+"="+strings.Join(f.Values, "|"))
	}
	return strings.Join(parts, ",")
}

func TestSpotInterruption(t *testing.T) {
	srv, c, clk := newServer(t, awsfake.Options{ShuttingDownDuration: 5 * time.Second, StoppingDuration: 5 * time.Second})
	spot := &types.InstanceMarketOptionsRequest{MarketType: types.MarketTypeSpot}
	a := aws.ToString(run(t, c, &ec2.RunInstancesInput{InstanceMarketOptions: spot}).Instances[0].InstanceId)
	b := aws.ToString(run(t, c, &ec2.RunInstancesInput{InstanceMarketOptions: spot}).Instances[0].InstanceId)
	od := aws.ToString(run(t, c, &ec2.RunInstancesInput{}).Instances[0].InstanceId)
	if err := srv.InterruptSpot(od, false); err == nil {
		t.Error("InterruptSpot of an on-demand instance succeeded")
	}
	if err := srv.InterruptSpot(a, false); err != nil {
		t.Fatal(err)
	}
	if err := srv.InterruptSpot(b, true); err != nil {
		t.Fatal(err)
	}
	clk.Add(5 * time.Second)
	out, err := c.DescribeInstances(ctx(t), &ec2.DescribeInstancesInput{InstanceIds: []string{a, b}})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, r := range out.Reservations {
		for _, in := range r.Instances {
			got[aws.ToString(in.InstanceId)] = string(in.State.Name) + "/" + aws.ToString(in.StateReason.Code)
		}
	}
	if got[a] != "terminated/Server.SpotInstanceTermination" || got[b] != "stopped/Server.SpotInstanceShutdown" {
		t.Errorf("states = %v", got)
	}
}

func TestConsoleOutputHostKey(t *testing.T) {
	srv, c, clk := newServer(t, awsfake.Options{PendingDuration: 10 * time.Second, ConsoleDelay: 20 * time.Second})
	id := aws.ToString(run(t, c, &ec2.RunInstancesInput{}).Instances[0].InstanceId)
	console := func() string {
		out, err := c.GetConsoleOutput(ctx(t), &ec2.GetConsoleOutputInput{InstanceId: aws.String(id)})
		if err != nil {
			t.Fatal(err)
		}
		b, err := base64.StdEncoding.DecodeString(aws.ToString(out.Output))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if s := console(); s != "" {
		t.Errorf("console of a pending instance = %q", s)
	}
	clk.Add(10 * time.Second)
	if s := console(); s != "" {
		t.Errorf("console before the console delay = %q", s)
	}
	clk.Add(20 * time.Second)
	snap, _ := srv.Instance(id)
	s := console()
	if !strings.Contains(s, "-----BEGIN SSH HOST KEY KEYS-----\r\n"+snap.HostKey+" root@") {
		t.Errorf("console lacks the host key %q:\n%s", snap.HostKey, s)
	}
	if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(snap.HostKey)); err != nil {
		t.Errorf("host key %q: %v", snap.HostKey, err)
	}
}

func TestWindowsPassword(t *testing.T) {
	srv, c, clk := newServer(t, awsfake.Options{PasswordDelay: time.Minute})
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := ssh.NewPublicKey(&key.PublicKey)
	imp, err := c.ImportKeyPair(ctx(t), &ec2.ImportKeyPairInput{KeyName: aws.String("win"), PublicKeyMaterial: ssh.MarshalAuthorizedKey(pub)})
	if err != nil {
		t.Fatalf("ImportKeyPair: %v", err)
	}
	if aws.ToString(imp.KeyName) != "win" || !strings.HasPrefix(aws.ToString(imp.KeyPairId), "key-") {
		t.Errorf("ImportKeyPair = %+v", imp)
	}
	_, err = c.ImportKeyPair(ctx(t), &ec2.ImportKeyPairInput{KeyName: aws.String("win"), PublicKeyMaterial: ssh.MarshalAuthorizedKey(pub)})
	if apiCode(err) != "InvalidKeyPair.Duplicate" {
		t.Errorf("second ImportKeyPair: %v, want InvalidKeyPair.Duplicate", err)
	}
	id := aws.ToString(run(t, c, &ec2.RunInstancesInput{ImageId: aws.String(winAMI), KeyName: aws.String("win")}).Instances[0].InstanceId)
	pw, err := c.GetPasswordData(ctx(t), &ec2.GetPasswordDataInput{InstanceId: aws.String(id)})
	if err != nil || aws.ToString(pw.PasswordData) != "" {
		t.Fatalf("GetPasswordData before the delay = %q, %v; want empty", aws.ToString(pw.PasswordData), err)
	}
	clk.Add(time.Minute)
	pw, err = c.GetPasswordData(ctx(t), &ec2.GetPasswordDataInput{InstanceId: aws.String(id)})
	if err != nil {
		t.Fatal(err)
	}
	ct, err := base64.StdEncoding.DecodeString(aws.ToString(pw.PasswordData))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := rsa.DecryptPKCS1v15(nil, key, ct) //nolint:staticcheck // EC2's scheme
	if err != nil {
		t.Fatal(err)
	}
	if string(pt) != srv.Password(id) || len(pt) < 12 {
		t.Errorf("decrypted %q, fake holds %q", pt, srv.Password(id))
	}
	if _, err := c.DeleteKeyPair(ctx(t), &ec2.DeleteKeyPairInput{KeyName: aws.String("win")}); err != nil {
		t.Fatal(err)
	}
	if kp := srv.KeyPairs(); len(kp) != 0 {
		t.Errorf("key pairs after delete: %v", kp)
	}
}

func TestRawProtocol(t *testing.T) {
	srv := awsfake.New(awsfake.Options{})
	hs := httptest.NewServer(srv)
	defer hs.Close()
	// post sends form unsigned (service "") or signed for service.
	post := func(form url.Values, service string) (*http.Response, string) {
		body := form.Encode()
		req, _ := http.NewRequest(http.MethodPost, hs.URL, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
		if service != "" {
			req = signedPost(t, hs.URL, service, body, body, awsfake.DefaultSecretAccessKey)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		_, _ = io.Copy(&b, resp.Body)
		return resp, b.String()
	}
	resp, body := post(url.Values{"Action": {"DescribeInstances"}, "Version": {"2016-11-15"}}, "")
	if resp.StatusCode != 401 || !strings.Contains(body, "<Code>MissingAuthenticationToken</Code>") {
		t.Errorf("unsigned: %d %s", resp.StatusCode, body)
	}
	resp, body = post(url.Values{"Action": {"DescribeInstances"}, "Version": {"2016-11-15"}}, "ec2")
	if resp.StatusCode != 200 || !strings.Contains(body, `<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">`) {
		t.Errorf("signed describe: %d %s", resp.StatusCode, body)
	}
	resp, body = post(url.Values{"Action": {"Bogus"}, "Version": {"2016-11-15"}}, "ec2")
	if resp.StatusCode != 400 || !strings.Contains(body, "<Response><Errors><Error><Code>InvalidAction</Code>") || !strings.Contains(body, "<RequestID>") {
		t.Errorf("bogus action: %d %s", resp.StatusCode, body)
	}
	resp, _ = post(url.Values{"Action": {"DescribeInstances"}, "Version": {"2014-01-01"}}, "ec2")
	if resp.StatusCode != 400 {
		t.Errorf("old version: %d", resp.StatusCode)
	}
	resp, body = post(url.Values{"Action": {"DescribeInstances"}, "Version": {"2016-11-15"}}, "s3")
	if resp.StatusCode != 401 || !strings.Contains(body, "AuthFailure") {
		t.Errorf("wrong service scope: %d %s", resp.StatusCode, body)
	}

	// The signature is checked always, also with the default credentials:
	// a made-up signature, a body changed after signing and a wrong
	// secret all fail.
	send := func(req *http.Request) (int, string) {
		t.Helper()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	signed := func(signBody, sendBody, secret string) *http.Request {
		return signedPost(t, hs.URL, "ec2", signBody, sendBody, secret)
	}
	describe := url.Values{"Action": {"DescribeInstances"}, "Version": {"2016-11-15"}}.Encode()
	terminate := url.Values{"Action": {"TerminateInstances"}, "Version": {"2016-11-15"}, "InstanceId.1": {"i-0123456789abcdef0"}}.Encode()
	madeUp := signed(describe, describe, awsfake.DefaultSecretAccessKey)
	madeUp.Header.Set("Authorization", regexp.MustCompile(`Signature=[0-9a-f]+`).ReplaceAllString(madeUp.Header.Get("Authorization"), "Signature="+strings.Repeat("ab", 32)))
	for name, req := range map[string]*http.Request{
		"made-up signature":          madeUp,
		"body changed after signing": signed(describe, terminate, awsfake.DefaultSecretAccessKey),
		"wrong secret":               signed(describe, describe, "not-the-secret"),
	} {
		if code, body := send(req); code != 401 || !strings.Contains(body, "<Code>AuthFailure</Code>") {
			t.Errorf("%s: %d %s, want 401 AuthFailure", name, code, body)
		}
	}
}
