package client

import (
	"context"

	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc"
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
	ackEvery := o.AckEvery
	if ackEvery <= 0 {
		ackEvery = 100
	}
	c := consuming{stub: eventsv1.NewEventServiceClient(conn), o: o, ackEvery: ackEvery}
	return reopen(ctx, o.Reconnects, c.afterAcknowledged, handle)
}

// consuming is one ConsumeEvents call: its consumer's processed and
// acknowledged positions.
type consuming struct {
	stub        eventsv1.EventServiceClient
	o           ConsumeOptions
	ackEvery    int
	done, acked int64 // the last processed and acknowledged positions
	unacked     int   // events processed since the last acknowledgement
}

// acknowledge acknowledges the last processed position, if it moved.
func (c *consuming) acknowledge(ctx context.Context) error {
	if c.done <= c.acked {
		return nil
	}
	_, err := c.stub.AckEvents(ctx, &eventsv1.AckEventsRequest{
		Consumer: c.o.Consumer, Member: c.o.Member, Position: c.done,
	})
	if err != nil {
		return err
	}
	c.acked, c.unacked = c.done, 0
	return nil
}

// afterAcknowledged is one StreamEvents call of the consumer: the service
// starts each after the consumer's acknowledged position, so every one
// asks for the same thing. A failed acknowledgement fails it, and is
// retried as its failure: the next stream starts after what was
// acknowledged.
func (c *consuming) afterAcknowledged(ctx context.Context, deliver func(*eventsv1.Event) error) error {
	request := &eventsv1.StreamEventsRequest{
		Consumer: c.o.Consumer, Member: c.o.Member, Types: c.o.Types, Subject: c.o.Subject,
		Follow: true, Progress: true,
	}
	return receive(ctx, c.stub, request, func(response *eventsv1.StreamEventsResponse) error {
		for _, event := range response.Events {
			if err := deliver(event); err != nil {
				return err
			}
			if event.Id > c.done {
				c.done = event.Id
			}
			if c.unacked++; c.unacked >= c.ackEvery {
				if err := c.acknowledge(ctx); err != nil {
					return err
				}
			}
		}
		if progress := response.Progress; progress != nil {
			// Every event up to it that matched was handled above.
			if progress.Position > c.done {
				c.done = progress.Position
			}
			return c.acknowledge(ctx)
		}
		return nil
	})
}
