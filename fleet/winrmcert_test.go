package fleet

import (
	"sync"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/schedule"
	"github.com/mayfly-ci/mayfly/vmexec/winrm/wsmantest"
)

// TestWaitsForPublishedWinRMCert is TestWaitsForPublishedHostKey for
// WinRM: a ConnectInfo without a certificate to pin means "not published
// yet", asked again until the boot watchdog deletes the instance.
func TestWaitsForPublishedWinRMCert(t *testing.T) {
	_, certPEM, err := wsmantest.SelfSignedCert("win-1.invalid")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		emptyFor  int // ConnectInfo calls answered without a certificate
		wantReady bool
	}{
		{"certificate appears on the fourth call", 3, true},
		{"certificate never appears", 1 << 30, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			calls := map[string]int{}
			ci := func(id string) (providers.ConnectInfo, error) {
				mu.Lock()
				defer mu.Unlock()
				calls[id]++
				c := providers.ConnectInfo{ID: id, Address: "127.0.0.1", Port: 5986, Protocol: providers.ProtocolWinRM,
					OS: "windows", Arch: "amd64", Username: "ci", Password: "Secret-1"}
				if calls[id] > tt.emptyFor {
					c.TLSCert = certPEM
				}
				return c, nil
			}
			h := newHarness(t, Config{Schedule: idlePolicy(schedule.Policy{IdleCount: 1}), Limits: Limits{BootTimeout: 5 * time.Minute}}, fake.Options{ConnectInfo: ci})
			h.start()
			first := h.providerIDs("")
			h.advance(6*time.Minute, 10*time.Second)
			mu.Lock()
			asked := calls[first[0]]
			mu.Unlock()
			ready := h.f.Available() == 1 && contains(h.providerIDs(""), first[0])
			if ready != tt.wantReady {
				t.Errorf("first instance ready = %v, want %v (ConnectInfo calls %v)", ready, tt.wantReady, calls)
			}
			if tt.wantReady && asked != tt.emptyFor+1 {
				t.Errorf("ConnectInfo asked %d times, want %d (until the certificate appeared)", asked, tt.emptyFor+1)
			}
			if !tt.wantReady {
				if contains(h.providerIDs(""), first[0]) {
					t.Errorf("instance without a WinRM certificate was not deleted")
				}
				if asked < 2 {
					t.Errorf("ConnectInfo asked %d times: a missing certificate was not retried", asked)
				}
			}
		})
	}
}
