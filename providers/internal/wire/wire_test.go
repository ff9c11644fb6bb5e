package wire

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/mayfly-ci/mayfly/providers"
	pb "github.com/mayfly-ci/mayfly/providers/proto/providerv1"
)

// scripted is a provider whose answers the test sets.
type scripted struct {
	info      providers.Info
	ids       []string
	list      []providers.Instance
	ci        providers.ConnectInfo
	err       error
	panicWith any
	gotLabels map[string]string
	gotN      int
	gotRaw    json.RawMessage
}

func (s *scripted) Init(_ context.Context, raw json.RawMessage) (providers.Info, error) {
	s.gotRaw = raw
	return s.info, s.err
}

func (s *scripted) Create(_ context.Context, n int, labels map[string]string) ([]string, error) {
	if s.panicWith != nil {
		panic(s.panicWith)
	}
	s.gotN, s.gotLabels = n, labels
	return s.ids, s.err
}

func (s *scripted) Delete(context.Context, []string) ([]string, error) { return s.ids, s.err }
func (s *scripted) List(context.Context) ([]providers.Instance, error) { return s.list, s.err }
func (s *scripted) ConnectInfo(context.Context, string) (providers.ConnectInfo, error) {
	return s.ci, s.err
}
func (s *scripted) Heartbeat(context.Context, string) error { return s.err }
func (s *scripted) Shutdown(context.Context) error          { return s.err }

// dial serves impl over an in-memory gRPC connection and returns a client.
func dial(t *testing.T, impl providers.Provider) *Client {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(RecoverUnary(nil)))
	pb.RegisterProviderServer(srv, &Server{Impl: impl})
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &Client{RPC: pb.NewProviderClient(conn)}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestErrorsCrossTheWire(t *testing.T) {
	tests := []struct {
		name  string
		err   error
		check func(t *testing.T, err error)
	}{
		{"not found", providers.NotFound("i-1"), func(t *testing.T, err error) {
			if !errors.Is(err, providers.ErrNotFound) || !providers.IsNotFound(err) {
				t.Errorf("not found lost: %v", err)
			}
		}},
		{"rate limited", providers.RateLimited(1500*time.Millisecond, errors.New("429")), func(t *testing.T, err error) {
			if ra, ok := providers.IsRateLimited(err); !ok || ra != 1500*time.Millisecond {
				t.Errorf("IsRateLimited = %s, %v", ra, ok)
			}
			if !providers.IsTransient(err) {
				t.Error("rate limit not transient")
			}
		}},
		{"quota", providers.QuotaExceeded("us-east1", errors.New("CPUS")), func(t *testing.T, err error) {
			if scope, ok := providers.IsQuotaExceeded(err); !ok || scope != "us-east1" {
				t.Errorf("IsQuotaExceeded = %q, %v", scope, ok)
			}
		}},
		{"capacity", providers.CapacityExhausted("us-east1-b", nil), func(t *testing.T, err error) {
			if scope, ok := providers.IsCapacityExhausted(err); !ok || scope != "us-east1-b" {
				t.Errorf("IsCapacityExhausted = %q, %v", scope, ok)
			}
		}},
		{"permanent", providers.Permanent(errors.New("bad credentials")), func(t *testing.T, err error) {
			if !providers.IsPermanent(err) || providers.IsTransient(err) {
				t.Errorf("permanent lost: kind %s", providers.KindOf(err))
			}
		}},
		{"transient", providers.Transient(errors.New("503")), func(t *testing.T, err error) {
			if !providers.IsTransient(err) || providers.IsPermanent(err) {
				t.Errorf("transient lost: kind %s", providers.KindOf(err))
			}
		}},
		{"invalid argument", providers.InvalidArgument(errors.New(`key "zone"`)), func(t *testing.T, err error) {
			if providers.KindOf(err) != providers.KindInvalidArgument {
				t.Errorf("kind %s", providers.KindOf(err))
			}
		}},
		{"plain", errors.New("boom"), func(t *testing.T, err error) {
			if providers.KindOf(err) != providers.KindUnknown {
				t.Errorf("kind %s, want unknown", providers.KindOf(err))
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, &scripted{err: tt.err, ids: []string{"i-1"}})
			ids, err := c.Create(ctx(t), 2, nil)
			if err == nil {
				t.Fatal("no error")
			}
			if err.Error() != tt.err.Error() {
				t.Errorf("message %q, want %q", err, tt.err)
			}
			if !slices.Equal(ids, []string{"i-1"}) {
				t.Errorf("partial ids = %v, want [i-1]", ids)
			}
			tt.check(t, err)
		})
	}
}

func TestFromStatusWithoutDetail(t *testing.T) {
	tests := []struct {
		code       codes.Code
		want       providers.Kind
		connection bool
	}{
		{codes.Unavailable, providers.KindTransient, true},
		{codes.Canceled, providers.KindTransient, true},
		{codes.DeadlineExceeded, providers.KindTransient, false},
		{codes.NotFound, providers.KindNotFound, false},
		{codes.ResourceExhausted, providers.KindRateLimited, false},
		{codes.Unimplemented, providers.KindPermanent, false},
		{codes.Internal, providers.KindUnknown, false},
	}
	for _, tt := range tests {
		err, _ := FromStatus(status.Error(tt.code, "x"))
		if got := providers.KindOf(err); got != tt.want {
			t.Errorf("%s: kind %s, want %s", tt.code, got, tt.want)
		}
		if got := errors.Is(err, ErrConnection); got != tt.connection {
			t.Errorf("%s: errors.Is(ErrConnection) = %v, want %v", tt.code, got, tt.connection)
		}
	}
}

func TestValuesCrossTheWire(t *testing.T) {
	created := time.Date(2025, 3, 1, 12, 0, 0, 123, time.UTC)
	s := &scripted{
		info: providers.Info{ID: "gce/us-east1", MaxSize: 700, Version: "1.2.3"},
		ids:  []string{"a", "b"},
		list: []providers.Instance{
			{ID: "a", State: providers.StateRunning, Labels: map[string]string{"mayfly-manager": "m"}, CreatedAt: created},
			{ID: "b", State: providers.StateFailed, Reason: "preempted"},
		},
		ci: providers.ConnectInfo{ID: "a", Address: "127.0.0.1", Port: 2222, Protocol: providers.ProtocolWinRM,
			OS: "windows", Arch: "amd64", Username: "Administrator", Password: "pw", TLSCert: []byte("cert")},
	}
	c := dial(t, s)
	info, err := c.Init(ctx(t), json.RawMessage(`{"zone":"us-east1-b"}`))
	if err != nil || info != s.info || string(s.gotRaw) != `{"zone":"us-east1-b"}` {
		t.Errorf("Init = %+v, %v (settings %s)", info, err, s.gotRaw)
	}
	ids, err := c.Create(ctx(t), 2, map[string]string{"k": "v"})
	if err != nil || !slices.Equal(ids, s.ids) || s.gotN != 2 || s.gotLabels["k"] != "v" {
		t.Errorf("Create = %v, %v (n %d labels %v)", ids, err, s.gotN, s.gotLabels)
	}
	list, err := c.List(ctx(t))
	if err != nil || len(list) != 2 {
		t.Fatalf("List = %v, %v", list, err)
	}
	if !list[0].CreatedAt.Equal(created) || list[0].Labels["mayfly-manager"] != "m" || list[0].State != providers.StateRunning {
		t.Errorf("List[0] = %+v", list[0])
	}
	if !list[1].CreatedAt.IsZero() || list[1].Reason != "preempted" || list[1].State != providers.StateFailed {
		t.Errorf("List[1] = %+v", list[1])
	}
	ci, err := c.ConnectInfo(ctx(t), "a")
	if err != nil || ci.Protocol != s.ci.Protocol || ci.Password != "pw" || string(ci.TLSCert) != "cert" || ci.Port != 2222 {
		t.Errorf("ConnectInfo = %+v, %v", ci, err)
	}
}

func TestInvalidValuesRefused(t *testing.T) {
	c := dial(t, &scripted{list: []providers.Instance{{ID: "a", State: "exploded"}}, ci: providers.ConnectInfo{Protocol: "rdp"}})
	if _, err := c.List(ctx(t)); !providers.IsPermanent(err) {
		t.Errorf("List with an invalid state: %v, want permanent error", err)
	}
	if _, err := c.ConnectInfo(ctx(t), "a"); !providers.IsPermanent(err) {
		t.Errorf("ConnectInfo with invalid protocol: %v, want permanent error", err)
	}
	if _, err := c.Create(ctx(t), -1, nil); providers.KindOf(err) != providers.KindInvalidArgument {
		t.Errorf("Create(-1): %v, want invalid argument", err)
	}
}

func TestPanicBecomesError(t *testing.T) {
	s := &scripted{panicWith: "nil map"}
	c := dial(t, s)
	_, err := c.Create(ctx(t), 1, nil)
	if err == nil || providers.KindOf(err) != providers.KindUnknown {
		t.Fatalf("Create panicking: %v (kind %s), want unknown error", err, providers.KindOf(err))
	}
	s.panicWith = nil
	if _, err := c.Create(ctx(t), 1, nil); err != nil {
		t.Errorf("Create after a panic: %v", err)
	}
}

func TestCallerContextKept(t *testing.T) {
	s := &scripted{}
	c := dial(t, s)
	cctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := c.List(cctx)
	if !errors.Is(err, context.Canceled) || !providers.IsTransient(err) {
		t.Errorf("List with canceled ctx: %v, want transient wrapping context.Canceled", err)
	}
}

// launching is a scripted provider that knows its instances' connect info
// at creation.
type launching struct {
	*scripted
	made []providers.Instance
}

func (l launching) Launch(_ context.Context, n int, _ map[string]string) ([]providers.Instance, error) {
	l.gotN = n
	return l.made, l.err
}

func TestLaunchCrossesTheWire(t *testing.T) {
	ci := providers.ConnectInfo{ID: "a", Address: "127.0.0.1", Port: 2222, Protocol: providers.ProtocolSSH,
		OS: "linux", Arch: "amd64", Username: "root", PrivateKey: []byte("PEM"), HostKey: "ssh-ed25519 AAAA"}
	tests := []struct {
		name     string
		impl     providers.Provider
		wantIDs  []string
		wantCI   []bool
		wantErr  bool
		wantKind providers.Kind
	}{
		{"a launching plugin gives connect info", launching{&scripted{}, []providers.Instance{
			{ID: "a", ConnectInfo: &ci}, {ID: "b", State: providers.StateRunning}}},
			[]string{"a", "b"}, []bool{true, false}, false, 0},
		{"a plugin that only creates gives ids", &scripted{ids: []string{"x", "y"}},
			[]string{"x", "y"}, []bool{false, false}, false, 0},
		{"a partial failure keeps the ids made", launching{&scripted{err: providers.QuotaExceeded("z", errors.New("full"))},
			[]providers.Instance{{ID: "a", ConnectInfo: &ci}}},
			[]string{"a"}, []bool{false}, true, providers.KindQuotaExceeded},
		{"connect info the wire cannot carry is refused, the ids kept", launching{&scripted{}, []providers.Instance{
			{ID: "a", ConnectInfo: &providers.ConnectInfo{ID: "a", Protocol: "rdp"}}}},
			[]string{"a"}, []bool{false}, true, providers.KindPermanent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, tt.impl)
			made, err := c.Launch(ctx(t), 2, nil)
			if got := providers.KindOf(err); tt.wantErr != (err != nil) || (err != nil && got != tt.wantKind) {
				t.Errorf("Launch error %v (kind %s), want error %v of kind %s", err, got, tt.wantErr, tt.wantKind)
			}
			var ids []string
			for i, in := range made {
				ids = append(ids, in.ID)
				if has := in.ConnectInfo != nil; i < len(tt.wantCI) && has != tt.wantCI[i] {
					t.Errorf("instance %s: connect info %v, want %v", in.ID, has, tt.wantCI[i])
				}
			}
			if !slices.Equal(ids, tt.wantIDs) {
				t.Fatalf("Launch ids %v, want %v", ids, tt.wantIDs)
			}
			if made[0].ConnectInfo != nil {
				got := *made[0].ConnectInfo
				if got.Address != ci.Address || got.Port != ci.Port || string(got.PrivateKey) != "PEM" || got.HostKey != ci.HostKey || got.Username != "root" {
					t.Errorf("connect info %+v, want %+v", got, ci)
				}
				if made[0].State != providers.StateCreating {
					t.Errorf("state %q, want creating when the plugin left it unset", made[0].State)
				}
			}
		})
	}
}

func TestListCarriesConnectInfo(t *testing.T) {
	ci := providers.ConnectInfo{ID: "a", Address: "127.0.0.1", Port: 22, Protocol: providers.ProtocolSSH, Username: "root", HostKey: "k"}
	c := dial(t, &scripted{list: []providers.Instance{{ID: "a", State: providers.StateRunning, ConnectInfo: &ci}, {ID: "b", State: providers.StateCreating}}})
	list, err := c.List(ctx(t))
	if err != nil || len(list) != 2 {
		t.Fatalf("List = %v, %v", list, err)
	}
	if list[0].ConnectInfo == nil || list[0].ConnectInfo.Port != 22 || list[0].ConnectInfo.HostKey != "k" || list[1].ConnectInfo != nil {
		t.Errorf("List connect info: %+v / %+v", list[0].ConnectInfo, list[1].ConnectInfo)
	}
}
