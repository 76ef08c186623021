// Command followers is bench/fanout.py's load generator: N StreamEvents
// follow streams against one service, each reading every event, recording
// when each event arrived.
//
// It is written in Go, like h2load for the unary calls, so that the
// followers' own CPU on this two-core machine stays small beside the
// service's: a Python client spent about 0.8 of a core receiving what
// 1,000 followers get, and took it from the process being measured.
//
// It speaks to bench/fanout.py over stdin/stdout, one line each way:
//
//	-> opened
//	-> live N                      (N followers received an event, or LIVE_TIMEOUT passed)
//	<- collect LO HI LAST ACKS OUT (ACKS: float64 acknowledgement times by offset)
//	-> {"missing":..,"refused":..,"ended":{..}}
//
// and writes to OUT the lags (float64 seconds) of offsets [LO, HI) for each
// follower in turn, once each has the event at offset LAST (or DRAIN_TIMEOUT
// passed): NaN for an event the follower did not receive, -1 for an offset
// with no event.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	method       = "/orderstream.events.v1.EventService/StreamEvents"
	retryAfter   = 100 * time.Millisecond // a refused follower's wait before it asks again
	liveTimeout  = 60 * time.Second
	drainTimeout = 60 * time.Second
	noEvent      = -1.0 // the lag written for an offset without an event
)

// rawCodec passes message bytes through: requests are built and responses
// read with protowire, so no generated code is needed.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// monotonic is CLOCK_MONOTONIC in seconds, the clock bench/fanout.py's
// time.monotonic() reads, so lags compare across the two processes.
func monotonic() float64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1, uintptr(unsafe.Pointer(&ts)), 0)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

type follower struct {
	received []float64 // receipt time by offset (id - after); 0: not yet
	lastID   int64     // atomic
	refused  int
	ended    string // the status the stream ended with, once finished is set
	finished int32  // atomic
}

func (f *follower) done() bool { return atomic.LoadInt32(&f.finished) != 0 }

func request(afterID int64) []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(afterID))
	b = protowire.AppendTag(b, 4, protowire.VarintType)
	b = protowire.AppendVarint(b, 1)
	return b
}

// eventIDs calls seen with the id of every event in one StreamEventsResponse.
func eventIDs(message []byte, seen func(int64)) error {
	for len(message) > 0 {
		num, typ, n := protowire.ConsumeTag(message)
		if n < 0 {
			return protowire.ParseError(n)
		}
		message = message[n:]
		if num != 1 || typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, message)
			if n < 0 {
				return protowire.ParseError(n)
			}
			message = message[n:]
			continue
		}
		event, n := protowire.ConsumeBytes(message)
		if n < 0 {
			return protowire.ParseError(n)
		}
		message = message[n:]
		for len(event) > 0 {
			enum, etyp, m := protowire.ConsumeTag(event)
			if m < 0 {
				return protowire.ParseError(m)
			}
			event = event[m:]
			if enum == 1 && etyp == protowire.VarintType {
				id, m := protowire.ConsumeVarint(event)
				if m < 0 {
					return protowire.ParseError(m)
				}
				seen(int64(id))
				break
			}
			m = protowire.ConsumeFieldValue(enum, etyp, event)
			if m < 0 {
				return protowire.ParseError(m)
			}
			event = event[m:]
		}
	}
	return nil
}

func (f *follower) run(ctx context.Context, conn *grpc.ClientConn, after int64, live chan<- struct{}) {
	once := sync.Once{}
	announce := func() { once.Do(func() { live <- struct{}{} }) }
	defer announce()
	desc := &grpc.StreamDesc{ServerStreams: true}
	for {
		stream, err := conn.NewStream(ctx, desc, method, grpc.ForceCodec(rawCodec{}))
		if err == nil {
			req := request(atomic.LoadInt64(&f.lastID))
			if err = stream.SendMsg(&req); err == nil {
				err = stream.CloseSend()
			}
		}
		var message []byte
		for err == nil {
			if err = stream.RecvMsg(&message); err != nil {
				break
			}
			now := monotonic()
			err = eventIDs(message, func(id int64) {
				if offset := id - after; offset < int64(len(f.received)) {
					f.received[offset] = now
				}
				atomic.StoreInt64(&f.lastID, id)
			})
			announce()
		}
		code := status.Code(err)
		if errors.Is(err, io.EOF) {
			code = codes.OK
		}
		switch {
		case code == codes.ResourceExhausted:
			f.refused++
			select {
			case <-time.After(retryAfter):
				continue
			case <-ctx.Done():
				return
			}
		case ctx.Err() != nil:
			return
		default:
			f.ended = code.String()
			atomic.StoreInt32(&f.finished, 1)
			return
		}
	}
}

func readFloats(path string) ([]float64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := make([]float64, len(data)/8)
	for i := range out {
		out[i] = math.Float64frombits(binary.LittleEndian.Uint64(data[8*i:]))
	}
	return out, nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "the service")
	count := flag.Int("count", 1, "followers")
	channels := flag.Int("channels", 4, "connections the followers are spread over")
	after := flag.Int64("after", 0, "the id to follow after")
	capacity := flag.Int("capacity", 1000, "offsets recorded per follower")
	flag.Parse()

	conns := make([]*grpc.ClientConn, *channels)
	for n := range conns {
		conn, err := grpc.Dial(*addr, grpc.WithInsecure())
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		conns[n] = conn
	}
	ctx, cancel := context.WithCancel(context.Background())
	followers := make([]*follower, *count)
	live := make(chan struct{}, *count)
	var running sync.WaitGroup
	for n := range followers {
		f := &follower{received: make([]float64, *capacity), lastID: *after}
		followers[n] = f
		running.Add(1)
		go func(conn *grpc.ClientConn) {
			defer running.Done()
			f.run(ctx, conn, *after, live)
		}(conns[n%*channels])
	}
	fmt.Println("opened")

	timeout := time.After(liveTimeout)
	for waiting := *count; waiting > 0; waiting-- {
		select {
		case <-live:
		case <-timeout:
			waiting = 0
		}
	}
	alive := 0
	for _, f := range followers {
		if atomic.LoadInt64(&f.lastID) > *after && !f.done() {
			alive++
		}
	}
	fmt.Printf("live %d\n", alive)

	var lo, hi, last int
	var acksPath, outPath string
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	if _, err := fmt.Sscanf(line, "collect %d %d %d %s %s", &lo, &hi, &last, &acksPath, &outPath); err != nil {
		fmt.Fprintln(os.Stderr, "bad collect line:", err)
		os.Exit(1)
	}
	acks, err := readFloats(acksPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	deadline := time.Now().Add(drainTimeout)
	for time.Now().Before(deadline) {
		done := true
		for _, f := range followers {
			if atomic.LoadInt64(&f.lastID) < *after+int64(last) && !f.done() {
				done = false
				break
			}
		}
		if done {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	running.Wait()

	lags := make([]byte, 0, 8*(hi-lo)*len(followers))
	missing, refused := 0, 0
	ended := map[string]int{}
	for _, f := range followers {
		refused += f.refused
		if f.ended != "" {
			ended[f.ended]++
		}
		for offset := lo; offset < hi; offset++ {
			lag := noEvent // an id the sequence skipped
			if offset < len(acks) && acks[offset] != 0 {
				if got := f.received[offset]; got != 0 {
					lag = math.Max(0, got-acks[offset])
				} else {
					lag = math.NaN()
					missing++
				}
			}
			lags = binary.LittleEndian.AppendUint64(lags, math.Float64bits(lag))
		}
	}
	if err := os.WriteFile(outPath, lags, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	summary, _ := json.Marshal(map[string]interface{}{"missing": missing, "refused": refused, "ended": ended})
	fmt.Println(string(summary))
}
