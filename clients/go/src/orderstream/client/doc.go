// Package client holds hand-written helpers over the generated stubs
// (orderstream/orders/v1 and orderstream/events/v1, from `make gen`), the
// same as Python's orderstream.client: a connection with TLS (optionally
// mutual), tokens, keepalive and the default service config; writes that
// always carry an idempotency key; uploads retried under their upload id;
// event streams that resume after the last event delivered; and durable
// consumers that acknowledge as they go.
//
//	conn, err := client.Dial(ctx, "dns:///orderstream:50051", client.Options{CAFile: "ca.crt"})
//	if err != nil { ... }
//	defer conn.Close()
//	err = client.StreamEvents(ctx, conn, client.StreamOptions{Subject: "orders/42", Follow: true},
//		func(event *eventsv1.Event) error { fmt.Println(event.Id, event.Type); return nil })
package client
