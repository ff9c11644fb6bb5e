package fleet

// deque is a double-ended queue of instances on a slice.
type deque struct {
	buf  []*instance
	head int
}

func (q *deque) len() int { return len(q.buf) - q.head }

func (q *deque) pushBack(in *instance) { q.buf = append(q.buf, in) }

func (q *deque) pushFront(in *instance) {
	if q.head > 0 {
		q.head--
		q.buf[q.head] = in
		return
	}
	q.buf = append(q.buf, nil)
	copy(q.buf[1:], q.buf)
	q.buf[0] = in
}

func (q *deque) popFront() *instance {
	in := q.buf[q.head]
	q.buf[q.head] = nil
	q.head++
	if q.head == len(q.buf) {
		q.buf, q.head = q.buf[:0], 0
	} else if q.head > 1024 && q.head > len(q.buf)/2 {
		n := copy(q.buf, q.buf[q.head:])
		clear(q.buf[n:])
		q.buf, q.head = q.buf[:n], 0
	}
	return in
}

// filter keeps the entries for which keep is true, in order.
func (q *deque) filter(keep func(*instance) bool) {
	out := q.buf[:0]
	for _, in := range q.buf[q.head:] {
		if keep(in) {
			out = append(out, in)
		}
	}
	clear(q.buf[len(out):])
	q.buf, q.head = out, 0
}
