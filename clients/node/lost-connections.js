// A lost connection is UNAVAILABLE, as gRPC's own libraries (grpc-core,
// grpc-go, grpc-js) report it. Connect's Node transport reports a
// connection reset under a call (ECONNRESET, EPIPE) as ABORTED, which on
// its servers means the client hung up; on a client it would keep the
// service config's retries on UNAVAILABLE and the helpers' reconnects from
// ever seeing a dropped connection.

import { Code, ConnectError } from "@connectrpc/connect";

const LOST_CONNECTION = new Set(["ECONNRESET", "EPIPE"]);

// Connect keeps Node's error as the cause of its own.
function lostConnection(error) {
  const seen = new Set();
  for (let cause = error; cause instanceof Error && !seen.has(cause); cause = cause.cause) {
    if (LOST_CONNECTION.has(cause.code)) return true;
    seen.add(cause);
  }
  return false;
}

function asUnavailable(error) {
  if (!lostConnection(error)) return error;
  const connectError = ConnectError.from(error);
  return new ConnectError(connectError.rawMessage, Code.Unavailable, connectError.metadata, undefined, error);
}

async function* messagesAsUnavailable(messages) {
  try {
    yield* messages;
  } catch (error) {
    throw asUnavailable(error);
  }
}

/**
 * A Connect interceptor that turns a call's lost connection into
 * UNAVAILABLE, whether it fails the call at once or a stream later on.
 * createOrderstreamClients installs it; a transport made by hand for
 * withServiceConfig wants it too.
 */
export const lostConnectionsAsUnavailable = (next) => async (request) => {
  try {
    const response = await next(request);
    return response.stream ? { ...response, message: messagesAsUnavailable(response.message) } : response;
  } catch (error) {
    throw asUnavailable(error);
  }
};
