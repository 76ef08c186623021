package client

import (
	"context"
	"errors"
	"io"

	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc/codes"
)

// reopen hands handle the events of one stream after another: stream makes
// one StreamEvents call with ctx, hands each event it receives to its
// handle, and returns when the call ends (nil), fails, or its handle
// returns an error. A stream that fails with UNAVAILABLE is replaced by a
// new one after a backoff, up to reconnects times in a row (5 when 0)
// without an event in between; it is up to stream to start where the last
// one stopped. handle's errors and any others are returned as they are.
func reopen(ctx context.Context, reconnects int, stream func(ctx context.Context, handle func(*eventsv1.Event) error) error, handle func(*eventsv1.Event) error) error {
	if reconnects == 0 {
		reconnects = 5
	}
	for failures := 0; ; {
		var fromHandle error // must not be retried, whatever its code
		err := streamOnce(ctx, stream, func(event *eventsv1.Event) error {
			failures = 0
			fromHandle = handle(event)
			return fromHandle
		})
		if err == nil || fromHandle != nil || !codeIn(err, codes.Unavailable) || failures >= reconnects {
			return err
		}
		failures++
		if err := sleep(ctx, failures); err != nil {
			return err
		}
	}
}

// streamOnce is one stream, whose call is cancelled on the way out: that
// ends it when handle stops early.
func streamOnce(ctx context.Context, stream func(context.Context, func(*eventsv1.Event) error) error, handle func(*eventsv1.Event) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	return stream(ctx, handle)
}

// receive makes one StreamEvents call with request and hands each of its
// responses to each, until the stream ends (nil), fails, or each returns
// an error.
func receive(ctx context.Context, stub eventsv1.EventServiceClient, request *eventsv1.StreamEventsRequest, each func(*eventsv1.StreamEventsResponse) error) error {
	call, err := stub.StreamEvents(ctx, request)
	if err != nil {
		return err
	}
	for {
		response, err := call.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := each(response); err != nil {
			return err
		}
	}
}
