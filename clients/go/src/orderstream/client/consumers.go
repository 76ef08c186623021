package client

import (
	"context"
	"errors"
	"io"

	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// ConsumeOptions say which durable consumer ConsumeEvents is, and which
// events it takes.
type ConsumeOptions struct {
	// Consumer is the durable consumer's name (required): the service keeps
	// its acknowledged position (docs/streams.md#durable-consumers).
	Consumer string
	// Member makes this one member of the consumer's group
	// (docs/streams.md#consumer-groups).
	Member  string
	Types   []string
	Subject string
	// AckEvery is how many processed events are acknowledged at once (100
	// when 0).
	AckEvery int
	// Reconnects is how many calls in a row may fail with UNAVAILABLE
	// before an event is handled (5 when 0).
	Reconnects int
}

// ConsumeEvents hands the consumer's events, from after its acknowledged
// position, to handle in feed order, one by one, following the feed until
// ctx ends or handle returns an error, which ConsumeEvents returns.
//
// An event counts as processed once handle returns nil for it: every
// AckEvery processed events, and at each progress message (a heartbeat
// while the filter matches nothing, the live end, a group's new
// partitions), the last processed position is acknowledged (AckEvents).
// Events not yet acknowledged when ConsumeEvents returns, or the process
// dies, are sent again to the consumer's next stream: process them
// idempotently (by event id).
//
// A stream that fails with UNAVAILABLE is reopened, up to Reconnects times
// in a row without an event handled in between; it resumes after the
// consumer's acknowledged position (a failed acknowledgement counts as
// the stream's failure). Other errors are returned as they are.
func ConsumeEvents(ctx context.Context, conn grpc.ClientConnInterface, o ConsumeOptions, handle func(*eventsv1.Event) error) error {
	reconnects := o.Reconnects
	if reconnects == 0 {
		reconnects = 5
	}
	ackEvery := o.AckEvery
	if ackEvery <= 0 {
		ackEvery = 100
	}
	c := consuming{ctx: ctx, stub: eventsv1.NewEventServiceClient(conn), o: o, ackEvery: ackEvery}
	for failures := 0; ; {
		fromHandle, err := c.stream(handle, func() { failures = 0 })
		if err == nil || fromHandle || !codeIn(err, codes.Unavailable) || failures >= reconnects {
			return err
		}
		failures++
		if err := sleep(ctx, failures); err != nil {
			return err
		}
	}
}

// consuming is one ConsumeEvents call: its consumer's processed and
// acknowledged positions.
type consuming struct {
	ctx         context.Context
	stub        eventsv1.EventServiceClient
	o           ConsumeOptions
	ackEvery    int
	done, acked int64 // the last processed and acknowledged positions
	unacked     int   // events processed since the last acknowledgement
}

// acknowledge acknowledges the last processed position, if it moved.
func (c *consuming) acknowledge() error {
	if c.done <= c.acked {
		return nil
	}
	_, err := c.stub.AckEvents(c.ctx, &eventsv1.AckEventsRequest{
		Consumer: c.o.Consumer, Member: c.o.Member, Position: c.done,
	})
	if err != nil {
		return err
	}
	c.acked, c.unacked = c.done, 0
	return nil
}

// stream is one StreamEvents call of the consumer; handled is called
// after each event handled. fromHandle tells whether the error came from
// handle, which must not be retried (a failed acknowledgement is retried
// as the stream's failure: the next stream starts after what was
// acknowledged).
func (c *consuming) stream(handle func(*eventsv1.Event) error, handled func()) (fromHandle bool, err error) {
	// Cancelled on the way out: ends the call when handle stops early.
	ctx, cancel := context.WithCancel(c.ctx)
	defer cancel()
	call, err := c.stub.StreamEvents(ctx, &eventsv1.StreamEventsRequest{
		Consumer: c.o.Consumer, Member: c.o.Member, Types: c.o.Types, Subject: c.o.Subject,
		Follow: true, Progress: true,
	})
	if err != nil {
		return false, err
	}
	for {
		response, err := call.Recv()
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		for _, event := range response.Events {
			if err := handle(event); err != nil {
				return true, err
			}
			handled()
			if event.Id > c.done {
				c.done = event.Id
			}
			if c.unacked++; c.unacked >= c.ackEvery {
				if err := c.acknowledge(); err != nil {
					return false, err
				}
			}
		}
		if progress := response.Progress; progress != nil {
			// Every event up to it that matched was handled above.
			if progress.Position > c.done {
				c.done = progress.Position
			}
			if err := c.acknowledge(); err != nil {
				return false, err
			}
		}
	}
}
