"""The image and the manifests, checked without a Docker engine or a cluster:
every kustomize overlay renders and passes the Kubernetes schemas, the
manifests agree with the server's settings, and the Dockerfile's exact
ENTRYPOINT serves against the test database."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.process import process_env, service_process

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted(path.name for path in (ROOT / "deploy" / "overlays").iterdir())
KUBERNETES_VERSION = "1.37.0"
SERVING = health_pb2.HealthCheckResponse.SERVING


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make install` installs Debian's kubernetes-client"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"


def documented_settings() -> set[str]:
    """Variables named in the first column of docs/configuration.md's table."""
    names = set()
    for line in CONFIGURATION_DOC.read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first))
    return names


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_there_are_dev_and_prod_overlays():
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_overlay_passes_the_kubernetes_schemas(rendered):
    kinds = {doc["kind"] for doc in rendered}
    assert kinds >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
    }
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_deployment_matches_the_server(rendered):
    config = one(rendered, "ConfigMap")["data"]
    deployment = one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == int(config["ORDERSTREAM_PORT"])
    assert ports["health"] == int(config["ORDERSTREAM_HEALTH_PORT"])
    assert ports["metrics"] == int(config["ORDERSTREAM_METRICS_PORT"])
    # Each worker serves its own metrics, on the next port.
    metrics_ports = sorted(port for name, port in ports.items() if name.startswith("metrics"))
    workers = int(config["ORDERSTREAM_WORKERS"])
    assert metrics_ports == [ports["metrics"] + i for i in range(workers)]
    # Native gRPC probes, on the plain-text health port (they cannot do TLS).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert config["ORDERSTREAM_TLS_CERT"].startswith("/etc/orderstream/tls/")
    # The kubelet's SIGKILL comes after preStop plus the server's own drain.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(config["ORDERSTREAM_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["topologySpreadConstraints"]
    secrets = {env["valueFrom"]["secretKeyRef"]["name"] for env in container["env"]}
    secrets |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {
        "orderstream-database",
        "orderstream-page-token",
        "orderstream-tls",
        "orderstream-auth",
        "orderstream-database-ca",
    }
    # Every setting the ConfigMap sets is one docs/configuration.md documents.
    assert set(config) <= documented_settings()


def test_callers_are_authenticated_from_the_auth_secret(rendered):
    """Closed by default: the tokens file (and, with mTLS, the certificate
    identities) come from the mounted auth Secret; no development switch."""
    config = one(rendered, "ConfigMap")["data"]
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "ORDERSTREAM_INSECURE_DEV" not in config
    files = ["ORDERSTREAM_AUTH_TOKENS_FILE"]
    if "ORDERSTREAM_TLS_CLIENT_CA" in config:
        files.append("ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE")
    for setting in files:
        directory, _, key = config[setting].rpartition("/")
        assert mounts[directory]["secret"]["secretName"] == "orderstream-auth", setting
        assert key in ("tokens", "identities"), setting


def named_namespaces(selector: dict[str, Any]) -> set[str]:
    """The namespaces a namespaceSelector admits when it admits them by
    name only (empty otherwise, e.g. for `{}` or a selector on other labels)."""
    name = "kubernetes.io/metadata.name"
    labels, expressions = selector.get("matchLabels", {}), selector.get("matchExpressions", [])
    if set(labels) - {name} or any(e["key"] != name for e in expressions):
        return set()
    if any(e["operator"] != "In" for e in expressions):
        return set()
    names = {labels[name]} if name in labels else set()
    for expression in expressions:
        names |= set(expression["values"])
    return names


def test_services_policy_and_migration(rendered):
    headless = one(rendered, "Service", "orderstream-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert one(rendered, "Service", "orderstream")["spec"]["type"] == "ClusterIP"
    policy = one(rendered, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    allowed = [rule["from"][0]["podSelector"]["matchLabels"] for rule in policy["ingress"]]
    assert allowed == [{"orderstream-client": "true"}, {"app.kubernetes.io/name": "prometheus"}]
    # Every peer names its namespaces: a pod label alone can be set by
    # anyone who can create a pod, in any namespace.
    for rule in policy["ingress"]:
        for peer in rule["from"]:
            assert named_namespaces(peer["namespaceSelector"]), peer
    # Migrating first selects exactly the settings and the Job.
    components = {
        d["metadata"].get("labels", {}).get("app.kubernetes.io/component") for d in rendered
    }
    assert {"config", "migration"} <= components
    job = one(rendered, "Job")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] == ["python", "-m", "service", "migrate"]
    assert (
        one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
        == (migrate["image"])
    )


# --------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_pinned_slim_and_non_root():
    instructions = dockerfile_instructions()
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:[\d.]+-slim-bookworm@sha256:[0-9a-f]{64}", base)
    assert len([op for op, _ in instructions if op == "FROM"]) == 2
    runtime = runtime_stage()
    env = " ".join(arg for op, arg in runtime if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    (user,) = [arg for op, arg in runtime if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    copies = [arg for op, arg in runtime if op == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]  # no sources, no build tools


def test_the_image_install_builds_the_extension(tmp_path):
    """The build stage's `pip install .`, on what .dockerignore lets in: the
    wheel must carry the compiled encoder and the migrations."""
    context = tmp_path / "context"
    shutil.copytree(
        ROOT / "service", context / "service", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, context / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "--wheel-dir", str(tmp_path), str(context)], check=True)
    (wheel,) = tmp_path.glob("orderstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert [n for n in names if re.fullmatch(r"service/events/wire\.cpython-.*\.so", n)], names
    assert "service/db/migrations/0001_orders_and_events.sql" in names
    # The development cluster is for `make run` and the tests only.
    assert not [n for n in names if n.startswith("devcluster/")], names


def entrypoint() -> list[str]:
    (command,) = [json.loads(arg) for op, arg in runtime_stage() if op == "ENTRYPOINT"]
    return command


async def test_the_entrypoint_serves(service_env, migrated, tmp_path):
    command = entrypoint()
    assert command == ["python", "-m", "service", "serve"]
    env = process_env(
        service_env,
        ORDERSTREAM_MIGRATE_ON_START="false",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
    )
    # `python` is the image's interpreter; here, the virtualenv's. Run from
    # an empty directory, as the image does, so the checkout is not on the path
    # by accident of the working directory.
    async with service_process(env, *command[3:], cwd=tmp_path) as child:
        port = (await child.record("serving"))["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest())
            while (await watch.read()).status != SERVING:
                pass
            watch.cancel()
        child.process.send_signal(signal.SIGTERM)
        assert await child.exit_code() == 0, child.output


def test_every_setting_is_in_the_configuration_doc():
    """The reverse of the ConfigMap check: nothing the service reads is
    missing from docs/configuration.md."""
    source = (ROOT / "service" / "settings.py").read_text()
    readme = CONFIGURATION_DOC.read_text()
    names = set(re.findall(r'"((?:ORDERSTREAM|PG)[A-Z_]*|DATABASE_URL)"', source))
    assert "ORDERSTREAM_POOL_MAX_SIZE" in names  # the pattern finds them
    assert sorted(name for name in names if f"`{name}`" not in readme) == []
