package awsfake_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/plugins/aws/awsfake"
)

// TestLocalInstanceOptions checks the options that let a local server play
// the instances: a fixed address, a fixed published host key, and the
// launch hook seeing each new instance (with its user data) exactly once,
// before RunInstances answers.
func TestLocalInstanceOptions(t *testing.T) {
	const hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeAcxcZBdVbpJadXlwY0UpdyPXHvWq5yLxRiY1g8r5p"
	var (
		mu       sync.Mutex
		launched []awsfake.Instance
	)
	srv, c, _ := newServer(t, awsfake.Options{
		Address: "127.0.0.1",
		HostKey: hostKey,
		OnLaunch: func(in awsfake.Instance) {
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

// TestDescribeInstanceAttribute reads attributes back with the SDK: the
// user data as RunInstances received it (base64 in <userData><value>), an
// empty <userData/> for an instance without any, and EC2's errors for a
// missing or unknown attribute and an unknown instance.
func TestDescribeInstanceAttribute(t *testing.T) {
	srv, c, _ := newServer(t, awsfake.Options{})
	userData := "<powershell>\r\nWrite-Output 'hello'\r\n</powershell>\r\n"
	with := aws.ToString(run(t, c, &ec2.RunInstancesInput{
		UserData: aws.String(base64.StdEncoding.EncodeToString([]byte(userData))), InstanceType: types.InstanceTypeM5Large,
	}).Instances[0].InstanceId)
	without := aws.ToString(run(t, c, &ec2.RunInstancesInput{}).Instances[0].InstanceId)

	out, err := c.DescribeInstanceAttribute(ctx(t), &ec2.DescribeInstanceAttributeInput{InstanceId: aws.String(with), Attribute: types.InstanceAttributeNameUserData})
	if err != nil {
		t.Fatalf("DescribeInstanceAttribute userData: %v", err)
	}
	if aws.ToString(out.InstanceId) != with || out.UserData == nil {
		t.Fatalf("answer %+v, want instance %s with user data", out, with)
	}
	got, err := base64.StdEncoding.DecodeString(aws.ToString(out.UserData.Value))
	if err != nil || string(got) != userData {
		t.Errorf("user data = %q (%v), want %q", got, err, userData)
	}
	out, err = c.DescribeInstanceAttribute(ctx(t), &ec2.DescribeInstanceAttributeInput{InstanceId: aws.String(without), Attribute: types.InstanceAttributeNameUserData})
	if err != nil || out.UserData == nil || out.UserData.Value != nil {
		t.Errorf("instance without user data: %+v, %v; want an empty userData", out, err)
	}
	out, err = c.DescribeInstanceAttribute(ctx(t), &ec2.DescribeInstanceAttributeInput{InstanceId: aws.String(with), Attribute: types.InstanceAttributeNameInstanceType})
	if err != nil || out.InstanceType == nil || aws.ToString(out.InstanceType.Value) != "m5.large" || out.UserData != nil {
		t.Errorf("instanceType: %+v, %v", out, err)
	}

	for _, tc := range []struct {
		id, attr, code string
	}{
		{with, "userdata", "InvalidParameterValue"}, // names are case-sensitive
		{"i-0123456789abcdef0", "userData", "InvalidInstanceID.NotFound"},
		{"bogus", "userData", "InvalidInstanceID.Malformed"},
	} {
		_, err := c.DescribeInstanceAttribute(ctx(t), &ec2.DescribeInstanceAttributeInput{InstanceId: aws.String(tc.id), Attribute: types.InstanceAttributeName(tc.attr)})
		if apiCode(err) != tc.code || httpStatus(err) != 400 {
			t.Errorf("DescribeInstanceAttribute(%s, %q) = %v, want %s (400)", tc.id, tc.attr, err, tc.code)
		}
	}
	if n := srv.Calls()["DescribeInstanceAttribute"]; n != 6 {
		t.Errorf("DescribeInstanceAttribute calls = %d, want 6", n)
	}
}

// TestDescribeInstanceAttributeXML checks the document on the wire.
func TestDescribeInstanceAttributeXML(t *testing.T) {
	srv := awsfake.New(awsfake.Options{})
	hs := httptest.NewServer(srv)
	defer hs.Close()
	c := client(hs.URL, awsfake.DefaultAccessKeyID, awsfake.DefaultSecretAccessKey)
	id := aws.ToString(run(t, c, &ec2.RunInstancesInput{UserData: aws.String(base64.StdEncoding.EncodeToString([]byte("abc")))}).Instances[0].InstanceId)
	none := aws.ToString(run(t, c, &ec2.RunInstancesInput{}).Instances[0].InstanceId)
	post := func(id, attr string) (int, string) {
		t.Helper()
		form := url.Values{"Action": {"DescribeInstanceAttribute"}, "Version": {awsfake.APIVersion}, "InstanceId": {id}}
		if attr != "" {
			form.Set("Attribute", attr)
		}
		req := signedPost(t, hs.URL, "ec2", form.Encode(), form.Encode(), awsfake.DefaultSecretAccessKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	status, body := post(id, "userData")
	want := `<DescribeInstanceAttributeResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>`
	if status != 200 || !strings.Contains(body, want) || !strings.Contains(body, "<instanceId>"+id+"</instanceId><userData><value>YWJj</value></userData></DescribeInstanceAttributeResponse>") {
		t.Errorf("userData document (%d):\n%s", status, body)
	}
	if status, body := post(none, "userData"); status != 200 || !strings.Contains(body, "<instanceId>"+none+"</instanceId><userData></userData></DescribeInstanceAttributeResponse>") {
		t.Errorf("document without user data (%d):\n%s", status, body)
	}
	if status, body := post(id, ""); status != 400 || !strings.Contains(body, "<Code>MissingParameter</Code>") {
		t.Errorf("without Attribute (%d):\n%s", status, body)
	}
}

// TestAddressForAndWindowsPassword checks the options that let local
// servers play Windows instances one by one: an address per instance from
// AddressFor (which sees the user data), and a fixed Administrator
// password that GetPasswordData returns encrypted for the key pair.
func TestAddressForAndWindowsPassword(t *testing.T) {
	const password = "Fixed-Passw0rd!"
	var seen []string
	srv, c, _ := newServer(t, awsfake.Options{
		WindowsPassword: password,
		AddressFor: func(in awsfake.Instance) string {
			seen = append(seen, string(in.UserData)) // under the server's lock
			return fmt.Sprintf("127.0.0.%d", len(seen)+1)
		},
	})
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := ssh.NewPublicKey(&key.PublicKey)
	if _, err := c.ImportKeyPair(ctx(t), &ec2.ImportKeyPairInput{KeyName: aws.String("win"), PublicKeyMaterial: ssh.MarshalAuthorizedKey(pub)}); err != nil {
		t.Fatal(err)
	}
	out := run(t, c, &ec2.RunInstancesInput{
		ImageId: aws.String(winAMI), KeyName: aws.String("win"), MinCount: aws.Int32(2), MaxCount: aws.Int32(2),
		UserData: aws.String(base64.StdEncoding.EncodeToString([]byte("<powershell></powershell>"))),
	})
	if len(seen) != 2 || seen[0] != "<powershell></powershell>" {
		t.Errorf("AddressFor saw user data %q", seen)
	}
	for i, in := range out.Instances {
		want := fmt.Sprintf("127.0.0.%d", i+2)
		if aws.ToString(in.PrivateIpAddress) != want || aws.ToString(in.PublicIpAddress) != want {
			t.Errorf("instance %d addresses %s/%s, want %s", i, aws.ToString(in.PrivateIpAddress), aws.ToString(in.PublicIpAddress), want)
		}
		id := aws.ToString(in.InstanceId)
		if srv.Password(id) != password {
			t.Errorf("%s password %q, want %q", id, srv.Password(id), password)
		}
		pw, err := c.GetPasswordData(ctx(t), &ec2.GetPasswordDataInput{InstanceId: aws.String(id)})
		if err != nil {
			t.Fatal(err)
		}
		ct, err := base64.StdEncoding.DecodeString(aws.ToString(pw.PasswordData))
		if err != nil {
			t.Fatal(err)
		}
		pt, err := rsa.DecryptPKCS1v15(nil, key, ct) //nolint:staticcheck // EC2's scheme
		if err != nil || string(pt) != password {
			t.Errorf("%s decrypted password %q (%v), want %q", id, pt, err, password)
		}
	}
}

// signedPost returns a POST of sendBody to endpoint, signed for service in
// us-east-1 with the SDK's SigV4 signer over signBody, as the default
// credentials of the fake with secret.
func signedPost(t *testing.T, endpoint, service, signBody, sendBody, secret string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, endpoint, strings.NewReader(sendBody))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	sum := sha256.Sum256([]byte(signBody))
	creds := aws.Credentials{AccessKeyID: awsfake.DefaultAccessKeyID, SecretAccessKey: secret}
	if err := v4.NewSigner().SignHTTP(t.Context(), creds, req, hex.EncodeToString(sum[:]), service, "us-east-1", time.Now()); err != nil {
		t.Fatal(err)
	}
	return req
}
