package sshexec

// EndSpareForTest ends the spare shell's session as if the machine had
// ended it, once it is open, and reports whether there was one.
func (c *Client) EndSpareForTest() bool {
	c.spares.mu.Lock()
	sp := c.spares.spare
	c.spares.mu.Unlock()
	if sp == nil {
		return false
	}
	<-sp.ready
	if sp.s == nil {
		return false
	}
	sp.s.ch.Close()
	<-sp.s.closed
	return true
}
