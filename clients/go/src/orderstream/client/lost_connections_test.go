// The retries against the real orderstream, through a TCP proxy that
// loses a connection the way networks do (proxy_test.go): the default
// service config, UploadEvents and StreamEvents each carry a call over a
// connection reset under it.
package client_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"orderstream/client"
	eventsv1 "orderstream/events/v1"
	ordersv1 "orderstream/orders/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// lostOnItsWay sends call into a blackhole; once its request has wholly
// left the client, every connection is reset: the request was lost on its
// way, and only a new attempt on a new connection can answer it.
func lostOnItsWay(ctx context.Context, t *testing.T, proxy *tcpProxy, call func() error) error {
	proxy.Blackhole()
	sent := proxy.RequestSent()
	answer := make(chan error, 1)
	go func() { answer <- call() }()
	select {
	case <-sent:
	case err := <-answer:
		t.Fatalf("the call ended before its request was sent: %v", err)
	case <-ctx.Done():
		t.Fatal("the request never left the client")
	}
	proxy.Cut()
	return <-answer
}

func TestAReadLostOnItsWayIsRetriedByTheServiceConfig(t *testing.T) {
	if os.Getenv("GRPC_GO_RETRY") != "on" {
		t.Fatal("set GRPC_GO_RETRY=on: grpc-go 1.33 applies the service config's retryPolicy only then")
	}
	ctx := timeout(t)
	order, err := client.CreateOrder(ctx, plain(t), newOrder(unique("go"), 1))
	if err != nil {
		t.Fatal(err)
	}
	proxy := newTCPProxy(t, env(t, "ORDERSTREAM_TARGET"))
	for _, serviceConfig := range []string{client.ServiceConfig, "{}"} {
		orders := ordersv1.NewOrderServiceClient(dial(t, proxy.Addr(), client.Options{Insecure: true, ServiceConfig: serviceConfig}))
		read := func() error {
			fetched, err := orders.GetOrder(ctx, &ordersv1.GetOrderRequest{Id: order.Id})
			if err == nil && fetched.Id != order.Id {
				return fmt.Errorf("got order %d, not %d", fetched.Id, order.Id)
			}
			return err
		}
		// Connected first, so that the blackhole takes the request itself.
		if err := read(); err != nil {
			t.Fatal(err)
		}
		before := proxy.Connections()
		err := lostOnItsWay(ctx, t, proxy, read)
		if serviceConfig == client.ServiceConfig {
			if err != nil || proxy.Connections() == before {
				t.Fatalf("with the service config: %v, after %d new connections", err, proxy.Connections()-before)
			}
		} else if status.Code(err) != codes.Unavailable {
			t.Fatalf("without the service config: %v, want UNAVAILABLE", err)
		}
	}
}

func TestUploadCutMidwayIsRetriedAndWrittenOnce(t *testing.T) {
	ctx := timeout(t)
	subject := unique("/go/upload-cut")
	events := newEvents(subject, 0, 400)
	padding := strings.Repeat("x", 200)
	size := 0
	for n, event := range events {
		event.Payload = &eventsv1.Event_JsonPayload{JsonPayload: fmt.Sprintf(`{"n": %d, "padding": %q}`, n, padding)}
		size += len(event.GetJsonPayload())
	}
	proxy := newTCPProxy(t, env(t, "ORDERSTREAM_TARGET"))
	proxy.CutAfter(size / 2)
	uploaded, err := client.UploadEvents(ctx, dial(t, proxy.Addr(), client.Options{Insecure: true}), events, client.UploadOptions{MaxBytes: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if uploaded.EventCount != 400 || proxy.Connections() < 2 {
		t.Fatalf("uploaded %v over %d connections, want 400 events over 2 or more", uploaded, proxy.Connections())
	}
	var stored []int
	err = client.StreamEvents(ctx, plain(t), client.StreamOptions{Subject: subject}, func(event *eventsv1.Event) error {
		var decoded struct{ N int }
		err := json.Unmarshal([]byte(event.GetJsonPayload()), &decoded)
		stored = append(stored, decoded.N)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for n, got := range stored {
		if got != n {
			t.Fatalf("event %d stored is n=%d: %v", n, got, stored)
		}
	}
	if len(stored) != 400 {
		t.Fatalf("stored %d events of 400 (once each, in order)", len(stored))
	}
}

func TestStreamEventsResumesAfterACutConnection(t *testing.T) {
	ctx, direct := timeout(t), plain(t)
	subject := unique("/go/stream-cut")
	published, err := client.PublishEvents(ctx, direct, newEvents(subject, 0, 50), client.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	proxy := newTCPProxy(t, env(t, "ORDERSTREAM_TARGET"))
	conn := dial(t, proxy.Addr(), client.Options{Insecure: true})
	o := client.StreamOptions{Subject: subject, Follow: true}
	received, err := collect(ctx, conn, o, 75, func(ids []int64) {
		if len(ids) != 10 {
			return
		}
		proxy.Cut()
		// Written while the stream is cut off: the resumed stream must
		// pick them up exactly once.
		more, err := client.PublishEvents(ctx, direct, newEvents(subject, 50, 25), client.WriteOptions{})
		if err != nil {
			t.Error(err)
		}
		published = append(published, more...)
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(received, published) || proxy.Connections() < 2 {
		t.Fatalf("over %d connections received %v\npublished %v", proxy.Connections(), received, published)
	}
}
