package qemuvm

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
)

func TestParseProcNetTCP(t *testing.T) {
	table := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0
`
	table6 := `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0051 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 666 1 0000000000000000 100 0 0 10 0
`
	tests := []struct {
		name   string
		table  string
		inodes []string
		want   []string
	}{
		{"loopback listener", table, []string{"111"}, []string{"127.0.0.1:8080"}},
		{"wildcard listener", table, []string{"222"}, []string{"0.0.0.0:22"}},
		{"established is not listening", table, []string{"333"}, nil},
		{"other process's socket", table, []string{"999"}, nil},
		{"two", table, []string{"111", "444", "333"}, []string{"127.0.0.1:8080", "127.0.0.1:8082"}},
		{"ipv6 loopback", table6, []string{"555"}, []string{"[::1]:80"}},
		{"ipv6 wildcard", table6, []string{"666"}, []string{"[::]:81"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inodes := map[string]bool{}
			for _, i := range tt.inodes {
				inodes[i] = true
			}
			got, err := parseProcNetTCP([]byte(tt.table), inodes)
			if err != nil {
				t.Fatal(err)
			}
			var gotS []string
			for _, a := range got {
				gotS = append(gotS, a.String())
			}
			if !slices.Equal(gotS, tt.want) {
				t.Errorf("got %v, want %v", gotS, tt.want)
			}
		})
	}
	if _, err := parseProcNetTCP([]byte("hdr\n 0: ZZ:1 0:0 0A 0 0 0 0 0 1\n"), map[string]bool{"1": true}); err == nil {
		t.Error("malformed address accepted")
	}
}

// TestListeningTCPOwnProcess checks the /proc reading against this process's
// own real listener.
func TestListeningTCPOwnProcess(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	want := l.Addr().(*net.TCPAddr).AddrPort()
	got, err := ListeningTCP(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(got, netip.AddrPortFrom(want.Addr().Unmap(), want.Port())) {
		t.Errorf("ListeningTCP(self) = %v, want it to contain %v", got, want)
	}
	if _, err := ListeningTCP(1 << 30); err == nil {
		t.Error("ListeningTCP(no such pid) succeeded")
	}
}
