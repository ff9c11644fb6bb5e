package gitlabci

import "testing"

func TestExpr(t *testing.T) {
	vars := map[string]string{"BRANCH": "main", "EMPTY": "", "RE": "/^ma/", "TAG": "v1.2"}
	tests := []struct {
		src  string
		want bool
	}{
		{`$BRANCH`, true}, {`$EMPTY`, false}, {`$UNSET`, false},
		{`$BRANCH == "main"`, true}, {`$BRANCH == 'main'`, true}, {`$BRANCH != "main"`, false},
		{`${BRANCH} == "main"`, true}, {`"main" == $BRANCH`, true},
		{`$UNSET == null`, true}, {`$EMPTY == null`, false}, {`$EMPTY == ""`, true}, {`$UNSET != null`, false},
		{`$BRANCH =~ /^MA/i`, true}, {`$BRANCH =~ /^MA/`, false}, {`$BRANCH !~ /x/`, true}, {`$UNSET =~ /.*/`, false},
		{`$BRANCH =~ $RE`, true}, {`$TAG =~ /^v\d+\.\d+$/`, true}, {`$TAG =~ /a\/b/`, false},
		{`$BRANCH == "main" && $TAG`, true}, {`$BRANCH == "x" || $TAG == "v1.2"`, true},
		{`$BRANCH == "x" || $TAG == "v1.2" && $EMPTY`, false},
		{`($BRANCH == "x" || $TAG == "v1.2") && $BRANCH`, true},
		{`$BRANCH == "x" || ($TAG == "v1.2" && $BRANCH)`, true},
	}
	for _, tt := range tests {
		e, err := CompileExpr(tt.src)
		if err != nil {
			t.Errorf("CompileExpr(%q): %v", tt.src, err)
			continue
		}
		got, err := e.Eval(vars)
		if err != nil || got != tt.want {
			t.Errorf("%s = %v, %v; want %v", tt.src, got, err, tt.want)
		}
	}
	for _, bad := range []string{``, `$`, `"open`, `$A ==`, `($A`, `$A $B`, `/x`, `$A =~ /x/q`, `&& $A`, `$A = "b"`} {
		if _, err := CompileExpr(bad); err == nil {
			t.Errorf("CompileExpr(%q) accepted", bad)
		}
	}
}
