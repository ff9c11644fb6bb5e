package mask

import (
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
)

// benchLog returns a 4 MiB log of CI-like lines with the secrets sprinkled in,
// and the 20 secrets.
func benchLog() ([]byte, []string) {
	r := rand.New(rand.NewPCG(42, 42))
	var secrets []string
	const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	for i := 0; i < 20; i++ {
		b := make([]byte, 16+r.IntN(24))
		for j := range b {
			b[j] = alnum[r.IntN(len(alnum))]
		}
		secrets = append(secrets, string(b))
	}
	log := make([]byte, 0, 4<<20+200)
	for i := 0; len(log) < 4<<20; i++ {
		line := fmt.Sprintf("\x1b[32;1m$ make test\x1b[0;m ok  \tgithub.com/example/pkg%d\t0.%03ds coverage: %d%% of statements\n", i, i%1000, i%100)
		if i%50 == 0 {
			line = "token=" + secrets[i%len(secrets)] + " " + line
		}
		log = append(log, line...)
	}
	return log[:4<<20], secrets
}

func BenchmarkMask(b *testing.B) {
	log, secrets := benchLog()
	for _, chunk := range []int{4 << 10, 64 << 10, 4 << 20} {
		b.Run(fmt.Sprintf("chunk=%d", chunk), func(b *testing.B) {
			b.SetBytes(int64(len(log)))
			b.ReportAllocs()
			for b.Loop() {
				w := NewWriter(io.Discard, secrets)
				for off := 0; off < len(log); off += chunk {
					w.Write(log[off:min(off+chunk, len(log))])
				}
				w.Close()
			}
		})
	}
}
