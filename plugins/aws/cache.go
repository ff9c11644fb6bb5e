package aws

import (
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// cached is an instance's data from the last EC2 answer that showed it,
// and when that answer came. It serves ConnectInfo and Heartbeat for
// Settings.CacheTTL.
type cached struct {
	inst types.Instance
	at   time.Time
}

// remember caches inst.
func (p *Provider) remember(inst types.Instance) {
	id := aws.ToString(inst.InstanceId)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cache[id] = cached{inst: inst, at: p.now()}
}

// forget drops all the plugin holds about the instances ids.
func (p *Provider) forget(ids ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range ids {
		delete(p.cache, id)
		delete(p.hostKeys, id)
		delete(p.passwords, id)
		delete(p.certs, id)
	}
}
