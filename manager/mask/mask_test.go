package mask

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
)

// reference masks s the slow, obvious way: find every occurrence of every
// variant of every secret, merge occurrences that overlap, replace each merged
// region with Text.
func reference(s string, secrets []string) string {
	type iv struct{ s, e int }
	var ivs []iv
	for _, sec := range secrets {
		for _, v := range Variants(sec) {
			for i := 0; i+len(v) <= len(s); i++ {
				if s[i:i+len(v)] == v {
					ivs = append(ivs, iv{i, i + len(v)})
				}
			}
		}
	}
	sort.Slice(ivs, func(i, j int) bool { return ivs[i].s < ivs[j].s })
	var merged []iv
	for _, x := range ivs {
		if n := len(merged); n > 0 && x.s < merged[n-1].e {
			merged[n-1].e = max(merged[n-1].e, x.e)
			continue
		}
		merged = append(merged, x)
	}
	var b strings.Builder
	last := 0
	for _, x := range merged {
		b.WriteString(s[last:x.s])
		b.WriteString(Text)
		last = x.e
	}
	b.WriteString(s[last:])
	return b.String()
}

// maskChunks writes input to a new Writer in the given chunks and closes it.
func maskChunks(t testing.TB, secrets []string, chunks ...string) string {
	t.Helper()
	var out bytes.Buffer
	w := NewWriter(&out, secrets)
	for _, c := range chunks {
		if n, err := w.Write([]byte(c)); err != nil || n != len(c) {
			t.Fatalf("Write(%q) = %d, %v", c, n, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return out.String()
}

func TestMaskTable(t *testing.T) {
	tests := []struct {
		name    string
		secrets []string
		in      string
		want    string
	}{
		{"no secrets", nil, "hello world", "hello world"},
		{"empty secret ignored", []string{""}, "hello", "hello"},
		{"one", []string{"s3cr3t-value-123"}, "masked=s3cr3t-value-123\n", "masked=[MASKED]\n"},
		{"twice", []string{"tok"}, "tok and tok", "[MASKED] and [MASKED]"},
		{"adjacent", []string{"tok"}, "toktok", "[MASKED][MASKED]"},
		{"self overlap", []string{"aa"}, "aaa", "[MASKED]"},
		{"at start", []string{"abc"}, "abcdef", "[MASKED]def"},
		{"at end", []string{"def"}, "abcdef", "abc[MASKED]"},
		{"whole", []string{"abc"}, "abc", "[MASKED]"},
		{"partial only", []string{"abcdef"}, "xxabcdexx", "xxabcdexx"},
		{"partial at end", []string{"abcdef"}, "xxabcde", "xxabcde"},
		{"longest wins (prefix)", []string{"abc", "abcdef"}, "-abcdef-", "-[MASKED]-"},
		{"longest wins (inside)", []string{"bcd", "abcdef"}, "-abcdef-", "-[MASKED]-"},
		{"longest wins (suffix)", []string{"def", "abcdef"}, "-abcdef-", "-[MASKED]-"},
		{"shorter alone", []string{"abc", "abcdef"}, "-abcdX-", "-[MASKED]dX-"},
		{"chain overlap", []string{"abc", "cde"}, "abcde", "[MASKED]"},
		{"overlap starts earlier later", []string{"bc", "abcd"}, "xabcdx", "x[MASKED]x"},
		{"two secrets", []string{"alpha", "beta"}, "alpha beta gamma", "[MASKED] [MASKED] gamma"},
		{"url encoded", []string{"p@ss:w/rd"}, "u=p%40ss%3Aw%2Frd x=p@ss:w/rd y=p@ss:w%2Frd", "u=[MASKED] x=[MASKED] y=[MASKED]"},
		{"path escaped", []string{"a b"}, "a%20b a+b a b", "[MASKED] [MASKED] [MASKED]"},
		{"unicode", []string{"пароль"}, "x пароль y", "x [MASKED] y"},
		{"newline in secret", []string{"a\nb"}, "a\nb\na", "[MASKED]\na"},
		{"literal mask text", []string{"K"}, "[MASKED]", "[MAS[MASKED]ED]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := maskChunks(t, tt.secrets, tt.in); got != tt.want {
				t.Errorf("mask(%q) = %q, want %q", tt.in, got, tt.want)
			}
			if ref := reference(tt.in, tt.secrets); ref != tt.want {
				t.Errorf("reference(%q) = %q, want %q (test table is wrong)", tt.in, ref, tt.want)
			}
		})
	}
}

// TestEverySplit writes each input in two and in three chunks at every
// possible pair of cut points, so every secret is split at every position,
// and checks the result equals the one-write result.
func TestEverySplit(t *testing.T) {
	cases := []struct {
		secrets []string
		in      string
	}{
		{[]string{"s3cr3t-value-123"}, "echo s3cr3t-value-123; s3cr3t-value-12 s3cr3t-value-123"},
		{[]string{"abc", "abcdef", "cdefg"}, "abcdefg abcdeabcdef abc"},
		{[]string{"aab", "ab"}, "aaabaabab"},
		{[]string{"JT-xyz", "glpat-123"}, "http://gitlab-ci-token:JT-xyz@h/g.git glpat-123glpat-12JT-xyJT-xyz"},
		{[]string{"end"}, "the very end"},
	}
	for _, c := range cases {
		want := reference(c.in, c.secrets)
		if got := maskChunks(t, c.secrets, c.in); got != want {
			t.Fatalf("one write: mask(%q) = %q, want %q", c.in, got, want)
		}
		n := len(c.in)
		for i := 0; i <= n; i++ {
			for j := i; j <= n; j++ {
				got := maskChunks(t, c.secrets, c.in[:i], c.in[i:j], c.in[j:])
				if got != want {
					t.Fatalf("chunks %q|%q|%q: got %q, want %q", c.in[:i], c.in[i:j], c.in[j:], got, want)
				}
			}
		}
		// Byte by byte.
		var chunks []string
		for i := 0; i < n; i++ {
			chunks = append(chunks, c.in[i:i+1])
		}
		if got := maskChunks(t, c.secrets, chunks...); got != want {
			t.Fatalf("byte by byte: got %q, want %q", got, want)
		}
	}
}

// TestHoldback checks the Writer holds back only a possible secret start and
// emits everything else at once.
func TestHoldback(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out, []string{"secret", "sesame"})
	step := func(in, wantOut string, wantHeld int) {
		t.Helper()
		if _, err := w.Write([]byte(in)); err != nil {
			t.Fatal(err)
		}
		if out.String() != wantOut || w.Held() != wantHeld {
			t.Fatalf("after %q: out %q held %d, want %q held %d", in, out.String(), w.Held(), wantOut, wantHeld)
		}
	}
	step("hello world\n", "hello world\n", 0) // nothing could start a secret
	step("a ses", "hello world\na ", 3)       // "ses" may become sesame
	step("s", "hello world\na ses", 1)        // "sess": only the last "s" can still start one
	step("ecre", "hello world\na ses", 5)     // "secre"
	step("t!", "hello world\na ses[MASKED]!", 0)
	step("se", "hello world\na ses[MASKED]!", 2)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got, want := out.String(), "hello world\na ses[MASKED]!se"; got != want {
		t.Fatalf("after Close: %q, want %q", got, want)
	}
	if _, err := w.Write([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Write after Close: %v, want ErrClosed", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestSecretAtEndOfStream: a complete secret at the end is masked when the
// stream ends, even though it could have grown into a longer one.
func TestSecretAtEndOfStream(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out, []string{"abc", "abcdef"})
	w.Write([]byte("x abc"))
	if got := out.String(); got != "x " {
		t.Fatalf("before Close: %q, want %q (abc may still become abcdef)", got, "x ")
	}
	w.Close()
	if got := out.String(); got != "x [MASKED]" {
		t.Fatalf("after Close: %q", got)
	}
}

// TestFlushMidSecret: Flush emits held bytes; the rest of a secret that
// continues after it is still masked, so the whole secret never appears.
func TestFlushMidSecret(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out, []string{"topsecret"})
	w.Write([]byte("a tops"))
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := out.String(); got != "a tops" {
		t.Fatalf("after Flush: %q", got)
	}
	w.Write([]byte("ecret b topsecret"))
	w.Close()
	if got, want := out.String(), "a tops[MASKED] b [MASKED]"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	f.n++
	return 0, errors.New("disk full")
}

func TestWriteErrorIsSticky(t *testing.T) {
	for _, secrets := range [][]string{nil, {"zzz"}} {
		fw := &failWriter{}
		w := NewWriter(fw, secrets)
		if _, err := w.Write([]byte("hello")); err == nil {
			t.Fatalf("secrets %q: first Write: want error", secrets)
		}
		if _, err := w.Write([]byte("again")); err == nil || fw.n != 1 {
			t.Fatalf("secrets %q: second Write: err %v, dst called %d times", secrets, err, fw.n)
		}
		if err := w.Close(); err == nil {
			t.Fatalf("secrets %q: Close: want the sticky error", secrets)
		}
	}
}

func TestVariants(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"plain-Token_123", []string{"plain-Token_123"}},
		{"a b", []string{"a b", "a+b", "a%20b"}},
		{"p@ss", []string{"p@ss", "p%40ss"}}, // PathEscape keeps @
		{"x/y", []string{"x/y", "x%2Fy"}},
	}
	for _, tt := range tests {
		if got := Variants(tt.in); fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("Variants(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestRandomChunking compares random inputs over a small alphabet, cut at
// random points, with the reference.
func TestRandomChunking(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	const alphabet = "abc%@ "
	word := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		return string(b)
	}
	for iter := 0; iter < 3000; iter++ {
		var secrets []string
		for k := r.IntN(4); k >= 0; k-- {
			secrets = append(secrets, word(1+r.IntN(5)))
		}
		in := word(r.IntN(60))
		want := reference(in, secrets)
		var chunks []string
		for rest := in; len(rest) > 0; {
			n := 1 + r.IntN(len(rest))
			chunks, rest = append(chunks, rest[:n]), rest[n:]
		}
		if got := maskChunks(t, secrets, chunks...); got != want {
			t.Fatalf("secrets %q chunks %q: got %q, want %q", secrets, chunks, got, want)
		}
	}
}

// FuzzMask checks, for arbitrary input, secrets and chunking, that the output
// contains no secret (with each [MASKED] taken as a separator) and does not
// depend on how the input was cut.
func FuzzMask(f *testing.F) {
	f.Add([]byte("masked=s3cr3t-value-123\n"), "s3cr3t-value-123", uint64(1))
	f.Add([]byte("abcdefg abcde"), "abc\x00abcdef\x00cdefg", uint64(7))
	f.Add([]byte("aaaaab"), "aab\x00ab", uint64(3))
	f.Add([]byte("u=p%40ss x=p@ss"), "p@ss", uint64(9))
	f.Fuzz(func(t *testing.T, in []byte, secretList string, seed uint64) {
		var secrets []string
		for _, s := range strings.Split(secretList, "\x00") {
			if s != "" && len(secrets) < 8 {
				secrets = append(secrets, s)
			}
		}
		whole := maskChunks(t, secrets, string(in))

		r := rand.New(rand.NewPCG(seed, seed>>7))
		var chunks []string
		for rest := string(in); len(rest) > 0; {
			n := 1 + r.IntN(len(rest))
			chunks, rest = append(chunks, rest[:n]), rest[n:]
		}
		if got := maskChunks(t, secrets, chunks...); got != whole {
			t.Fatalf("chunked %q: %q, one write: %q", chunks, got, whole)
		}
		sep := strings.ReplaceAll(whole, Text, "\x00")
		for _, s := range secrets {
			for _, v := range Variants(s) {
				if strings.Contains(sep, v) {
					t.Fatalf("output %q contains secret %q", whole, v)
				}
			}
		}
		if ref := reference(string(in), secrets); whole != ref {
			t.Fatalf("got %q, reference %q", whole, ref)
		}
	})
}
