package client_test

import (
	"net"
	"sync"
	"testing"
)

// tcpProxy stands between a client and the real service and breaks its
// connections as networks do (tests/support/tcp_proxy.py is the Python
// suite's, clients/node/test-support/tcp-proxy.js the Node one's):
// Blackhole silently drops every byte both ways from then on; Cut resets
// every open connection (an RST, no FIN) and lets bytes flow again on the
// connections that follow, as a dropped connection, not a dead host, does;
// CutAfter cuts once so many more bytes from clients have passed. It reads
// the HTTP/2 frames clients send, so that a test can wait until a request
// has wholly left its client (RequestSent) before losing it.
type tcpProxy struct {
	upstream string
	listener net.Listener

	mu          sync.Mutex
	open        map[*net.TCPConn]bool
	connections int
	blackholed  bool
	passBytes   int // client bytes still to pass before a cut; -1: no cut armed
	waiting     []chan struct{}
}

func newTCPProxy(t *testing.T, upstream string) *tcpProxy {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{upstream: upstream, listener: listener, open: map[*net.TCPConn]bool{}, passBytes: -1}
	go p.accept()
	t.Cleanup(func() {
		listener.Close()
		p.Cut()
	})
	return p
}

// Addr is where clients connect.
func (p *tcpProxy) Addr() string { return p.listener.Addr().String() }

// Connections counts the connections accepted so far.
func (p *tcpProxy) Connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.connections
}

// Blackhole drops every byte either side sends from now on.
func (p *tcpProxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blackholed = true
}

// CutAfter lets bytes more bytes from clients pass, then cuts.
func (p *tcpProxy) CutAfter(bytes int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.passBytes = bytes
}

// Cut resets every open connection; bytes flow again on new ones.
func (p *tcpProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for conn := range p.open {
		conn.SetLinger(0) // Close sends an RST
		conn.Close()
	}
	p.open = map[*net.TCPConn]bool{}
	p.blackholed, p.passBytes = false, -1
}

// RequestSent is closed once the next request has wholly passed (or been
// dropped).
func (p *tcpProxy) RequestSent() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	sent := make(chan struct{})
	p.waiting = append(p.waiting, sent)
	return sent
}

func (p *tcpProxy) requestSent() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, sent := range p.waiting {
		close(sent)
	}
	p.waiting = nil
}

func (p *tcpProxy) accept() {
	for {
		client, err := p.listener.Accept()
		if err != nil {
			return // closed
		}
		server, err := net.Dial("tcp", p.upstream)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		p.connections++
		p.open[client.(*net.TCPConn)], p.open[server.(*net.TCPConn)] = true, true
		p.mu.Unlock()
		requests := &requestEnds{prefaceLeft: http2PrefaceBytes, sent: p.requestSent}
		go p.pipe(client, server, requests)
		go p.pipe(server, client, nil)
	}
}

// pipe copies from one side to the other until either is closed; requests
// reads what a client sends (nil the other way).
func (p *tcpProxy) pipe(from, to net.Conn, requests *requestEnds) {
	defer to.Close()
	buffer := make([]byte, 32<<10)
	for {
		n, err := from.Read(buffer)
		if err != nil {
			return
		}
		if requests != nil {
			requests.read(buffer[:n])
		}
		pass, cut := p.passing(n, requests != nil)
		if _, err := to.Write(buffer[:pass]); err != nil {
			return
		}
		if cut {
			p.Cut()
		}
	}
}

// passing says how much of n bytes read goes on, and whether to cut after.
func (p *tcpProxy) passing(n int, fromClient bool) (pass int, cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.blackholed:
		return 0, false
	case fromClient && p.passBytes >= 0 && n >= p.passBytes:
		return p.passBytes, true
	case fromClient && p.passBytes >= 0:
		p.passBytes -= n
	}
	return n, false
}

// Every HTTP/2 connection opens with a preface, then frames follow, each
// behind a 9-byte header: length (3 bytes), type, flags, stream id.
const (
	http2PrefaceBytes     = 24
	http2FrameHeaderBytes = 9
	http2Data             = 0x0
	http2Headers          = 0x1
	http2EndStream        = 0x1
)

// requestEnds calls sent for each frame that ends a request's half of its
// stream: the request has wholly left the client.
type requestEnds struct {
	prefaceLeft int
	buffered    []byte
	sent        func()
}

func (r *requestEnds) read(chunk []byte) {
	r.buffered = append(r.buffered, chunk...)
	skipped := r.prefaceLeft
	if skipped > len(r.buffered) {
		skipped = len(r.buffered)
	}
	r.buffered, r.prefaceLeft = r.buffered[skipped:], r.prefaceLeft-skipped
	for len(r.buffered) >= http2FrameHeaderBytes {
		header := r.buffered
		frameBytes := http2FrameHeaderBytes + (int(header[0])<<16 | int(header[1])<<8 | int(header[2]))
		if len(r.buffered) < frameBytes {
			return
		}
		if (header[3] == http2Data || header[3] == http2Headers) && header[4]&http2EndStream != 0 {
			r.sent()
		}
		r.buffered = r.buffered[frameBytes:]
	}
}
