package deploy

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/hashicorp/hcl/v2/hclwrite"
	"github.com/zclconf/go-cty/cty"
	"github.com/zclconf/go-cty/cty/function"
	"github.com/zclconf/go-cty/cty/function/stdlib"
)

// tfModule is the parsed deploy/gcp module.
type tfModule struct {
	resources map[string]*hclsyntax.Block // "type.name"
	variables map[string]*hclsyntax.Block
	locals    map[string]bool
	outputs   map[string]*hclsyntax.Block
	exprs     []hclsyntax.Expression // every attribute expression, for reference checks
}

func loadTerraform(t *testing.T) *tfModule {
	t.Helper()
	files, err := filepath.Glob("gcp/*.tf")
	if err != nil || len(files) == 0 {
		t.Fatalf("no gcp/*.tf: %v", err)
	}
	p := hclparse.NewParser()
	m := &tfModule{resources: map[string]*hclsyntax.Block{}, variables: map[string]*hclsyntax.Block{}, locals: map[string]bool{}, outputs: map[string]*hclsyntax.Block{}}
	for _, f := range files {
		file, diags := p.ParseHCLFile(f)
		if diags.HasErrors() {
			t.Fatalf("parse %s: %s", f, diags.Error())
		}
		body := file.Body.(*hclsyntax.Body)
		for _, b := range body.Blocks {
			collectExprs(b, &m.exprs)
			switch b.Type {
			case "resource":
				m.resources[b.Labels[0]+"."+b.Labels[1]] = b
			case "variable":
				m.variables[b.Labels[0]] = b
			case "output":
				m.outputs[b.Labels[0]] = b
			case "locals":
				for name := range b.Body.Attributes {
					m.locals[name] = true
				}
			}
		}
	}
	return m
}

// collectExprs appends the expressions of block's attributes and nested
// blocks, but not a variable's type constraint, which is no reference.
func collectExprs(block *hclsyntax.Block, out *[]hclsyntax.Expression) {
	for name, a := range block.Body.Attributes {
		if block.Type == "variable" && name == "type" {
			continue
		}
		*out = append(*out, a.Expr)
	}
	for _, b := range block.Body.Blocks {
		collectExprs(b, out)
	}
}

// refs returns the references in expr as dotted names, e.g.
// "google_service_account.manager.email" or "var.region".
func refs(expr hclsyntax.Expression) []string {
	var out []string
	for _, tr := range expr.Variables() {
		parts := []string{tr.RootName()}
		for _, step := range tr[1:] {
			if a, ok := step.(hcl.TraverseAttr); ok {
				parts = append(parts, a.Name)
			}
		}
		out = append(out, strings.Join(parts, "."))
	}
	return out
}

// value evaluates expr with var.* bound to the variables' defaults.
func (m *tfModule) value(t *testing.T, expr hclsyntax.Expression) cty.Value {
	t.Helper()
	vars := map[string]cty.Value{}
	for name, b := range m.variables {
		if d, ok := b.Body.Attributes["default"]; ok {
			v, diags := d.Expr.Value(nil)
			if diags.HasErrors() {
				t.Fatalf("variable %s: default: %s", name, diags.Error())
			}
			vars[name] = v
		}
	}
	v, diags := expr.Value(&hcl.EvalContext{
		Variables: map[string]cty.Value{"var": cty.ObjectVal(vars)},
		Functions: map[string]function.Function{"concat": stdlib.ConcatFunc, "upper": stdlib.UpperFunc, "length": stdlib.LengthFunc},
	})
	if diags.HasErrors() {
		t.Fatalf("evaluate %s: %s", expr.Range(), diags.Error())
	}
	return v
}

func (m *tfModule) strings(t *testing.T, body *hclsyntax.Body, name string) []string {
	t.Helper()
	a, ok := body.Attributes[name]
	if !ok {
		return nil
	}
	v := m.value(t, a.Expr)
	var out []string
	for it := v.ElementIterator(); it.Next(); {
		_, e := it.Element()
		out = append(out, e.AsString())
	}
	return out
}

func (m *tfModule) str(t *testing.T, body *hclsyntax.Body, name string) string {
	t.Helper()
	a, ok := body.Attributes[name]
	if !ok {
		return ""
	}
	v := m.value(t, a.Expr)
	if v.Type() == cty.Number {
		return v.AsBigFloat().Text('f', -1)
	}
	if v.Type() == cty.Bool {
		if v.True() {
			return "true"
		}
		return "false"
	}
	return v.AsString()
}

func attrRefs(body *hclsyntax.Body, name string) []string {
	a, ok := body.Attributes[name]
	if !ok {
		return nil
	}
	return refs(a.Expr)
}

// firewall is one google_compute_firewall, evaluated.
type firewall struct {
	name, direction    string
	priority           string
	sourceRanges       []string
	destRanges         []string
	sourceTags         []string
	sourceSAs          []string // references
	targetSAs          []string // references
	targetTags         []string
	action             string // allow | deny
	protocols          []string
	ports              []string
	hasOtherRuleBlocks bool
}

func (m *tfModule) firewalls(t *testing.T) []firewall {
	var out []firewall
	for key, b := range m.resources {
		if !strings.HasPrefix(key, "google_compute_firewall.") {
			continue
		}
		fw := firewall{
			name:         key,
			direction:    m.str(t, b.Body, "direction"),
			priority:     m.str(t, b.Body, "priority"),
			sourceRanges: m.strings(t, b.Body, "source_ranges"),
			destRanges:   m.strings(t, b.Body, "destination_ranges"),
			sourceTags:   m.strings(t, b.Body, "source_tags"),
			targetTags:   m.strings(t, b.Body, "target_tags"),
			sourceSAs:    attrRefs(b.Body, "source_service_accounts"),
			targetSAs:    attrRefs(b.Body, "target_service_accounts"),
		}
		for _, rb := range b.Body.Blocks {
			if rb.Type != "allow" && rb.Type != "deny" {
				continue
			}
			if fw.action != "" && fw.action != rb.Type {
				fw.hasOtherRuleBlocks = true
			}
			fw.action = rb.Type
			fw.protocols = append(fw.protocols, m.str(t, rb.Body, "protocol"))
			fw.ports = append(fw.ports, m.strings(t, rb.Body, "ports")...)
		}
		out = append(out, fw)
	}
	return out
}

const (
	managerSA = "google_service_account.manager.email"
	runnerSA  = "google_service_account.runner_vm.email"
)

func TestTerraformReferences(t *testing.T) {
	m := loadTerraform(t)
	for _, e := range m.exprs {
		for _, r := range refs(e) {
			parts := strings.Split(r, ".")
			switch parts[0] {
			case "var":
				if m.variables[parts[1]] == nil {
					t.Errorf("%s: var.%s is not declared in variables.tf", e.Range(), parts[1])
				}
			case "local":
				if !m.locals[parts[1]] {
					t.Errorf("%s: local.%s is not defined", e.Range(), parts[1])
				}
			case "count", "each", "self", "path", "terraform", "data":
			default:
				if len(parts) < 2 || m.resources[parts[0]+"."+parts[1]] == nil {
					t.Errorf("%s: reference %s names no resource of this module", e.Range(), r)
				}
			}
		}
	}
	for name, b := range m.variables {
		if _, ok := b.Body.Attributes["description"]; !ok {
			t.Errorf("variable %s has no description", name)
		}
	}
	for name, b := range m.outputs {
		if _, ok := b.Body.Attributes["value"]; !ok {
			t.Errorf("output %s has no value", name)
		}
	}
	for _, o := range []string{"network", "runner_subnetwork", "manager_service_account", "runner_vm_service_account", "cache_bucket"} {
		if m.outputs[o] == nil {
			t.Errorf("no output %s", o)
		}
	}
	readme, err := os.ReadFile("gcp/README.md")
	if err != nil || !strings.Contains(string(readme), "NOT been applied") {
		t.Errorf("gcp/README.md must say plainly that the Terraform has NOT been applied (%v)", err)
	}
}

func TestTerraformFirewall(t *testing.T) {
	m := loadTerraform(t)
	fws := m.firewalls(t)
	var toRunners []firewall
	for _, fw := range fws {
		if fw.direction != "INGRESS" && fw.direction != "EGRESS" {
			t.Errorf("%s: direction %q", fw.name, fw.direction)
		}
		if fw.hasOtherRuleBlocks {
			t.Errorf("%s mixes allow and deny blocks", fw.name)
		}
		if len(fw.targetSAs) == 0 {
			t.Errorf("%s has no target_service_accounts: it would apply to every VM in the network", fw.name)
		}
		if len(fw.targetTags) > 0 || len(fw.sourceTags) > 0 {
			t.Errorf("%s selects by network tag; tags can be set by anyone who may edit an instance", fw.name)
		}
		if fw.direction == "INGRESS" && fw.action == "allow" && slices.Contains(fw.sourceRanges, "0.0.0.0/0") {
			t.Errorf("%s allows ingress from the whole internet", fw.name)
		}
		if slices.Equal(fw.targetSAs, []string{runnerSA}) {
			toRunners = append(toRunners, fw)
		}
	}

	// Only the manager reaches job VMs, on exactly 22 and 5986.
	var allowIn, denyAll, denyPeers, denyOutPrivate, allowOut *firewall
	for i := range toRunners {
		fw := &toRunners[i]
		switch {
		case fw.direction == "INGRESS" && fw.action == "allow":
			if allowIn != nil {
				t.Errorf("two ingress allow rules for job VMs: %s and %s", allowIn.name, fw.name)
			}
			allowIn = fw
		case fw.direction == "INGRESS" && fw.action == "deny" && slices.Equal(fw.sourceRanges, []string{"0.0.0.0/0"}):
			denyAll = fw
		case fw.direction == "INGRESS" && fw.action == "deny" && slices.Equal(fw.sourceSAs, []string{runnerSA}):
			denyPeers = fw
		case fw.direction == "EGRESS" && fw.action == "deny":
			denyOutPrivate = fw
		case fw.direction == "EGRESS" && fw.action == "allow":
			allowOut = fw
		}
	}
	if allowIn == nil || denyAll == nil || denyPeers == nil || denyOutPrivate == nil || allowOut == nil {
		t.Fatalf("job VM rules: allow-in %v, deny-all-in %v, deny-vm-to-vm %v, deny-out-private %v, allow-out %v; want all five", allowIn != nil, denyAll != nil, denyPeers != nil, denyOutPrivate != nil, allowOut != nil)
	}
	if !slices.Equal(allowIn.sourceSAs, []string{managerSA}) || len(allowIn.sourceRanges) > 0 {
		t.Errorf("%s: sources %v %v, want only the manager's service account", allowIn.name, allowIn.sourceSAs, allowIn.sourceRanges)
	}
	ports := slices.Clone(allowIn.ports)
	slices.Sort(ports)
	if !slices.Equal(allowIn.protocols, []string{"tcp"}) || !slices.Equal(ports, []string{"22", "5986"}) {
		t.Errorf("%s: allows %v ports %v, want tcp 22 and 5986", allowIn.name, allowIn.protocols, allowIn.ports)
	}
	for _, fw := range []*firewall{denyAll, denyPeers, denyOutPrivate} {
		if !slices.Equal(fw.protocols, []string{"all"}) {
			t.Errorf("%s: denies %v, want all protocols", fw.name, fw.protocols)
		}
	}
	prio := func(fw *firewall) int {
		n := 0
		for _, c := range fw.priority {
			n = n*10 + int(c-'0')
		}
		return n
	}
	if !(prio(allowIn) < prio(denyAll)) {
		t.Errorf("%s (priority %s) must win over %s (priority %s)", allowIn.name, allowIn.priority, denyAll.name, denyAll.priority)
	}
	if !(prio(denyPeers) < prio(allowIn)) || !(prio(denyOutPrivate) < prio(allowOut)) {
		t.Error("the VM-to-VM and private-egress denies must win over the allows")
	}
	if !slices.Equal(allowOut.destRanges, []string{"0.0.0.0/0"}) {
		t.Errorf("%s: destinations %v, want the internet", allowOut.name, allowOut.destRanges)
	}
	// The private-egress deny covers both subnets, so a job VM reaches
	// neither another VM nor a manager.
	for _, sub := range []string{"google_compute_subnetwork.runners", "google_compute_subnetwork.managers"} {
		b := m.resources[sub]
		if b == nil {
			t.Fatalf("no %s", sub)
		}
		_, subnet, err := net.ParseCIDR(m.str(t, b.Body, "ip_cidr_range"))
		if err != nil {
			t.Fatalf("%s: %v", sub, err)
		}
		covered := false
		for _, r := range denyOutPrivate.destRanges {
			if _, n, err := net.ParseCIDR(r); err == nil && n.Contains(subnet.IP) {
				ones, _ := n.Mask.Size()
				sones, _ := subnet.Mask.Size()
				covered = covered || ones <= sones
			}
		}
		if !covered {
			t.Errorf("%s (%s) is not covered by %s %v", sub, subnet, denyOutPrivate.name, denyOutPrivate.destRanges)
		}
	}
}

func TestTerraformIAMAndCache(t *testing.T) {
	m := loadTerraform(t)
	role := m.resources["google_project_iam_custom_role.manager"]
	if role == nil {
		t.Fatal("no google_project_iam_custom_role.manager")
	}
	perms := m.strings(t, role.Body, "permissions")
	for _, p := range []string{
		"compute.instances.create", "compute.instances.delete", "compute.instances.get",
		"compute.instances.list", "compute.instances.setMetadata", "compute.instances.getSerialPortOutput",
		"compute.instances.getGuestAttributes", "compute.zoneOperations.get", "compute.disks.create",
		"compute.subnetworks.use", "compute.instances.setServiceAccount",
	} {
		if !slices.Contains(perms, p) {
			t.Errorf("custom role lacks %s, which the gce plugin needs", p)
		}
	}
	for _, p := range perms {
		if strings.Contains(p, "*") || !strings.HasPrefix(p, "compute.") {
			t.Errorf("custom role grants %s: more than managing job VMs", p)
		}
	}
	for key, b := range m.resources {
		if !strings.HasPrefix(key, "google_project_iam_") || strings.HasPrefix(key, "google_project_iam_custom_role.") {
			continue
		}
		if r := attrRefs(b.Body, "role"); !slices.Equal(r, []string{"google_project_iam_custom_role.manager.name"}) {
			t.Errorf("%s grants %v on the project; only the custom role may be granted there", key, b.Body.Attributes["role"].Expr.Range())
		}
		if slices.ContainsFunc(attrRefs(b.Body, "member"), func(s string) bool { return strings.Contains(s, "runner_vm") }) {
			t.Errorf("%s grants a role to the job VMs' service account, which must have none", key)
		}
	}

	bucket := m.resources["google_storage_bucket.cache"]
	if bucket == nil {
		t.Fatal("no google_storage_bucket.cache")
	}
	if m.str(t, bucket.Body, "public_access_prevention") != "enforced" || m.str(t, bucket.Body, "uniform_bucket_level_access") != "true" {
		t.Error("the cache bucket must enforce public access prevention and uniform access")
	}
	expiry := ""
	for _, rule := range bucket.Body.Blocks {
		if rule.Type != "lifecycle_rule" {
			continue
		}
		var age, action string
		for _, b := range rule.Body.Blocks {
			switch b.Type {
			case "condition":
				age = m.str(t, b.Body, "age")
			case "action":
				action = m.str(t, b.Body, "type")
			}
		}
		if action == "Delete" {
			expiry = age
		}
	}
	if expiry != "14" {
		t.Errorf("cache bucket deletes objects after %q days, want 14", expiry)
	}

	// The manager may sign cache URLs and nothing more; the VMs get nothing.
	exact := func(roleKey string, want ...string) {
		r := m.resources[roleKey]
		if r == nil {
			t.Errorf("no %s", roleKey)
			return
		}
		got := m.strings(t, r.Body, "permissions")
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s grants %v, want exactly %v", roleKey, got, want)
		}
	}
	exact("google_project_iam_custom_role.cache_signer", "storage.objects.get", "storage.objects.create", "storage.objects.delete")
	exact("google_project_iam_custom_role.sign_blob", "iam.serviceAccounts.signBlob")
	for key, want := range map[string]string{
		"google_storage_bucket_iam_member.manager_cache":       "google_project_iam_custom_role.cache_signer.name",
		"google_service_account_iam_member.manager_signs_urls": "google_project_iam_custom_role.sign_blob.name",
	} {
		b := m.resources[key]
		if b == nil {
			t.Errorf("no %s", key)
			continue
		}
		if r := attrRefs(b.Body, "role"); !slices.Equal(r, []string{want}) {
			t.Errorf("%s grants %v, want %s", key, r, want)
		}
		if r := attrRefs(b.Body, "member"); !slices.Equal(r, []string{"google_service_account.manager.email"}) {
			t.Errorf("%s grants to %v, want the manager's service account only", key, r)
		}
	}
	if r := attrRefs(m.resources["google_service_account_iam_member.manager_signs_urls"].Body, "service_account_id"); !slices.Equal(r, []string{"google_service_account.manager.name"}) {
		t.Errorf("signBlob is granted on %v, want the manager's own service account", r)
	}
	for key, b := range m.resources {
		if strings.Contains(key, "iam_member") && slices.ContainsFunc(attrRefs(b.Body, "member"), func(s string) bool { return strings.Contains(s, "runner_vm") }) {
			t.Errorf("%s grants a role to the job VMs' service account", key)
		}
	}
}

// TestTerraformFmt checks every .tf file is in canonical form: unchanged
// by hclwrite.Format, the HCL formatter terraform fmt is built on. It needs
// no terraform binary, so it runs everywhere (CI included).
func TestTerraformFmt(t *testing.T) {
	files, err := filepath.Glob("gcp/*.tf")
	if err != nil || len(files) == 0 {
		t.Fatalf("no gcp/*.tf files (%v)", err)
	}
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if got := hclwrite.Format(src); !bytes.Equal(got, src) {
			t.Errorf("%s is not formatted (terraform fmt would change it); formatted:\n%s", f, got)
		}
	}
}
