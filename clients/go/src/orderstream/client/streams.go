package client

import (
	"context"

	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc"
)

// StreamOptions say which events StreamEvents delivers.
type StreamOptions struct {
	AfterID int64
	Types   []string
	Subject string
	Follow  bool
	// Reconnects is how many calls in a row may fail with UNAVAILABLE
	// before anything is received (5 when 0).
	Reconnects int
}

// StreamEvents hands the events after AfterID to handle in feed order, one
// by one, until the stream ends (never, with Follow), ctx ends, or handle
// returns an error, which StreamEvents returns.
//
// When the stream fails with UNAVAILABLE (connection lost, replica shutting
// down), a new StreamEvents call resumes after the id of the last event
// handed to handle: the feed is ordered by id, so that is neither a gap nor
// a duplicate. Each event received resets the count of reconnects. Other
// errors are returned as they are.
func StreamEvents(ctx context.Context, conn grpc.ClientConnInterface, o StreamOptions, handle func(*eventsv1.Event) error) error {
	stub := eventsv1.NewEventServiceClient(conn)
	lastID := o.AfterID
	afterLastID := func(ctx context.Context, deliver func(*eventsv1.Event) error) error {
		request := &eventsv1.StreamEventsRequest{AfterId: lastID, Types: o.Types, Subject: o.Subject, Follow: o.Follow}
		return receive(ctx, stub, request, func(response *eventsv1.StreamEventsResponse) error {
			for _, event := range response.Events {
				if err := deliver(event); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return reopen(ctx, o.Reconnects, afterLastID, func(event *eventsv1.Event) error {
		lastID = event.Id
		return handle(event)
	})
}
