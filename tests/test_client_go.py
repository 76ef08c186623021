"""The Go client (clients/go) against the real service: `go test` builds it
with Debian's Go in GOPATH mode (offline, see clients/go/README.md) and runs
it against the session's service (directly and through a TCP proxy that
cuts connections), a closed mTLS one that takes tokens, and a service
process that its follow test stops with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from orderstream.client import DEFAULT_SERVICE_CONFIG
from tests.support.client_servers import restarted_after_sigterm, secured_service

REPO = Path(__file__).resolve().parents[1]
GO_CLIENT = REPO / "clients" / "go"
GO_ENV = {
    "GO111MODULE": "off",
    # The hand-written package, the generated stubs, Debian's grpc-go.
    "GOPATH": f"{GO_CLIENT}:{GO_CLIENT / 'gen'}:/usr/share/gocode",
    # grpc-go 1.33 applies the service config's retryPolicy only when asked.
    "GRPC_GO_RETRY": "on",
}
GO_TESTS = {
    "TestServiceConfigIsPythons",
    "TestOptionsThatCannotGoTogether",
    "TestCreateAndGetAnOrder",
    "TestPageThroughAList",
    "TestUploadRequestsStayUnderTheBudget",
    "TestUploadAndReadBack",
    "TestWritesCarryRequestIDs",
    "TestMutualTLSAndTokens",
    "TestFollowSurvivesASigtermOfItsServer",
    "TestConsumeEventsResumesAfterWhatItAcknowledged",
    "TestConsumeEventsReopensABrokenStreamAfterWhatItAcknowledged",
    "TestConsumeEventsDoesNotReopenAStreamThatFailedOtherwise",
    "TestAReadLostOnItsWayIsRetriedByTheServiceConfig",
    "TestUploadCutMidwayIsRetriedAndWrittenOnce",
    "TestStreamEventsResumesAfterACutConnection",
}

pytestmark = pytest.mark.slow


async def go_test(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "go",
        "test",
        "-count=1",
        "-v",
        "orderstream/client",
        env={**os.environ, **GO_ENV, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


# Building grpc-go from source takes a minute on a cold cache.
@pytest.mark.timeout(600)
async def test_go_client_suite_passes(app, service_env, tmp_path):
    async with (
        secured_service(service_env, tmp_path) as secured,
        restarted_after_sigterm(service_env) as restarting,
    ):
        code, out = await go_test(
            {
                "ORDERSTREAM_TARGET": f"127.0.0.1:{app.port}",
                "ORDERSTREAM_PYTHON_SERVICE_CONFIG": json.dumps(DEFAULT_SERVICE_CONFIG),
                **secured,
                **restarting.client_env(),
            }
        )
        assert code == 0, out
        # The follow test's SIGTERM was graceful and the port served again.
        assert await restarting.first.exit_code() == 0, restarting.first.output
        assert restarting.second.done(), out
    assert set(re.findall(r"--- PASS: (\w+)", out)) == GO_TESTS, out
