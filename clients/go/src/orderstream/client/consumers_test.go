package client_test

import (
	"context"
	"net"
	"reflect"
	"sync"
	"testing"

	"orderstream/client"
	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// breakingServer's first stream sends events 1-3 and fails UNAVAILABLE;
// the next starts again after the acknowledged position (2), as the
// service would, and ends after a progress message.
type breakingServer struct {
	eventsv1.UnimplementedEventServiceServer
	mu       sync.Mutex
	requests []*eventsv1.StreamEventsRequest
	acks     []*eventsv1.AckEventsRequest
	fail     codes.Code
}

func events(ids ...int64) []*eventsv1.Event {
	found := make([]*eventsv1.Event, len(ids))
	for n, id := range ids {
		found[n] = &eventsv1.Event{Id: id, Type: "t", Source: "s", Subject: "s"}
	}
	return found
}

func (s *breakingServer) StreamEvents(request *eventsv1.StreamEventsRequest, stream eventsv1.EventService_StreamEventsServer) error {
	s.mu.Lock()
	s.requests = append(s.requests, request)
	first := len(s.requests) == 1
	s.mu.Unlock()
	if s.fail != codes.OK {
		return status.Error(s.fail, "no such thing")
	}
	if first {
		if err := stream.Send(&eventsv1.StreamEventsResponse{Events: events(1, 2, 3)}); err != nil {
			return err
		}
		return status.Error(codes.Unavailable, "connection lost")
	}
	if err := stream.Send(&eventsv1.StreamEventsResponse{Events: events(3, 4)}); err != nil {
		return err
	}
	return stream.Send(&eventsv1.StreamEventsResponse{Progress: &eventsv1.StreamProgress{Position: 10}})
}

func (s *breakingServer) AckEvents(_ context.Context, request *eventsv1.AckEventsRequest) (*eventsv1.AckEventsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.acks = append(s.acks, request)
	return &eventsv1.AckEventsResponse{Position: request.Position}, nil
}

func serve(t *testing.T, s *breakingServer) *grpc.ClientConn {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	eventsv1.RegisterEventServiceServer(server, s)
	go server.Serve(listener)
	t.Cleanup(server.Stop)
	return dial(t, listener.Addr().String(), client.Options{Insecure: true})
}

func TestConsumeEventsReopensABrokenStreamAfterWhatItAcknowledged(t *testing.T) {
	s := &breakingServer{}
	conn, ctx := serve(t, s), timeout(t)
	var received []int64
	o := client.ConsumeOptions{Consumer: "billing", Member: "m1", Types: []string{"t"}, AckEvery: 2}
	err := client.ConsumeEvents(ctx, conn, o, func(event *eventsv1.Event) error {
		received = append(received, event.Id)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// At least once: the 3rd was handled but not acknowledged when the
	// stream broke, so it comes again.
	if want := []int64{1, 2, 3, 3, 4}; !reflect.DeepEqual(received, want) {
		t.Fatalf("received %v, want %v", received, want)
	}
	var acked []int64
	for _, ack := range s.acks {
		if ack.Consumer != "billing" || ack.Member != "m1" {
			t.Fatalf("acknowledged %v", ack)
		}
		acked = append(acked, ack.Position)
	}
	// The last is the progress message's.
	if want := []int64{2, 3, 10}; !reflect.DeepEqual(acked, want) {
		t.Fatalf("acknowledged %v, want %v", acked, want)
	}
	want := &eventsv1.StreamEventsRequest{Consumer: "billing", Member: "m1", Types: []string{"t"}, Follow: true, Progress: true}
	if len(s.requests) != 2 {
		t.Fatalf("%d streams, want 2", len(s.requests))
	}
	for _, request := range s.requests {
		if !proto.Equal(request, want) {
			t.Fatalf("a stream asked for %v, want %v", request, want)
		}
	}
}

func TestConsumeEventsDoesNotReopenAStreamThatFailedOtherwise(t *testing.T) {
	s := &breakingServer{fail: codes.InvalidArgument}
	conn, ctx := serve(t, s), timeout(t)
	err := client.ConsumeEvents(ctx, conn, client.ConsumeOptions{Consumer: "billing"}, func(*eventsv1.Event) error {
		t.Fatal("an event")
		return nil
	})
	if status.Code(err) != codes.InvalidArgument || len(s.requests) != 1 {
		t.Fatalf("%v after %d streams", err, len(s.requests))
	}
}
