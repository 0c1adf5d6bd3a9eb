"""A local run of exactly what the chart's CI profile starts, minus Kubernetes.

The chart is rendered with values-ci.yaml; the migration Jobs' commands run first, then
every Deployment's command as its own process with the environment the kubelet would
give it (ConfigMap, Secret, downward API), then the `helm test` pod's commands. Only what
is specific to a cluster is mapped: the Service host names become 127.0.0.1 on free
ports (the __ADDRESS, __PORT and __METRICS_PORT values), the bundled PostgreSQL becomes a
fresh database per service on the local server, the bundled Redis the local one with a
stream prefix of this run's own. The kubelet's gRPC probes are sent as it would send them.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import cluster
from tests import infra
from tests.helm.chart import Manifest, component, container_env, find, render_profile, resource_name

PROFILE = "ci"
STARTUP_SECONDS = 60
COMMAND_SECONDS = 60
LOYALTY = Path(sys.executable).parent / "loyalty"


@dataclass
class LocalCluster:
    """Where each service of the chart runs on this machine, and the processes running it."""

    manifests: list[Manifest]
    services: list[str]
    ports: dict[str, int]
    metrics_ports: dict[str, int]
    database_urls: dict[str, str]
    stream_prefix: str
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def localize(self, env: Mapping[str, str]) -> dict[str, str]:
        """The rendered environment with every cluster-specific value mapped to this machine."""
        local = dict(env)
        for name in self.services:
            group = f"LOYALTY_{name.upper()}__"
            for key, value in (
                ("PORT", str(self.ports[name])),
                ("METRICS_PORT", str(self.metrics_ports[name])),
                ("ADDRESS", f"127.0.0.1:{self.ports[name]}"),
                ("DATABASE_URL", self.database_urls[name]),
            ):
                if group + key in local:
                    local[group + key] = value
        for key, value in (
            ("LOYALTY_REDIS_URL", infra.REDIS_URL),
            ("LOYALTY_STREAM_PREFIX", self.stream_prefix),
            # A pod listens on all its interfaces; this machine's test run only on loopback.
            ("LOYALTY_BIND_HOST", "127.0.0.1"),
        ):
            if key in local:
                local[key] = value
        local.pop("LOYALTY_OTLP_ENDPOINT", None)
        hosts = "|".join(re.escape(resource_name(name)) for name in (*self.services, "postgresql", "redis"))
        a_host = re.compile(rf"(?:^|[/@])(?:{hosts})(?::|/|$)")
        leftovers = {key: value for key, value in local.items() if a_host.search(value)}
        assert leftovers == {}, "a cluster host name the local run does not map"
        return {"PATH": os.environ["PATH"], **local}

    def command(self, container: Mapping[str, Any]) -> list[str]:
        argv = [*container.get("command", []), *container.get("args", [])]
        assert argv and argv[0] == "loyalty", f"{container['name']} runs {argv}: not the image's `loyalty` command"
        return [str(LOYALTY), *argv[1:]]

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.logs[name] = log
        self.processes[name] = subprocess.Popen(
            argv, env=dict(env), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    async def run(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
        """Runs a Job's or a test pod's container to completion; fails the test unless it exits 0."""
        completed = await asyncio.to_thread(
            subprocess.run, argv, env=dict(env), cwd=self.workdir, capture_output=True, timeout=COMMAND_SECONDS
        )
        output = (completed.stdout + completed.stderr).decode(errors="replace")
        assert completed.returncode == 0, f"{name}: {' '.join(argv[1:])} exited {completed.returncode}:\n{output}"
        return output

    def stop(self, grace_seconds: float) -> dict[str, int | None]:
        """SIGTERM, as the kubelet sends it; a process still running after the grace period is killed."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes[name] = None
        for log in self.logs.values():
            log.close()
        return codes


@pytest.fixture
async def local_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    manifests = render_profile(PROFILE)
    services = sorted(
        component(d)
        for d in find(manifests, "Deployment")
        if d.pod_spec["containers"][0]["command"][:2] == ["loyalty", "serve"]
    )
    prefix = f"loyalty_helm_{uuid.uuid4().hex[:8]}"
    database_urls = await cluster.create_databases(infra.POSTGRES_ADMIN_DSN, prefix, services)
    local = LocalCluster(
        manifests=manifests,
        services=services,
        ports={name: infra.free_port() for name in services},
        metrics_ports={name: infra.free_port() for name in services},
        database_urls=database_urls,
        stream_prefix=prefix,
        workdir=tmp_path,
    )
    try:
        yield local
    finally:
        local.stop(grace_seconds=5)
        await cluster.drop_databases(infra.POSTGRES_ADMIN_DSN, prefix, services)
        await infra.flush_redis_prefix(prefix)


async def _probe(port: int, service: str) -> int:
    """What the kubelet's native gRPC probe asks: grpc.health.v1.Health/Check."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.aio.AioRpcError:
            return int(health_pb2.HealthCheckResponse.UNKNOWN)
        return int(reply.status)


async def _wait_until_ready(local: LocalCluster, name: str, probe: Mapping[str, Any]) -> None:
    try:
        async with asyncio.timeout(STARTUP_SECONDS):
            while await _probe(local.ports[name], probe["grpc"].get("service", "")) != (
                health_pb2.HealthCheckResponse.SERVING
            ):
                process = local.processes[name]
                assert process.poll() is None, f"{name} exited {process.returncode}:\n{local.log_tail(name)}"
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{name} never became ready:\n{local.log_tail(name)}") from None


async def test_what_the_ci_profile_starts_serves_a_smoke_receipt(local_cluster: LocalCluster) -> None:
    local, manifests = local_cluster, local_cluster.manifests
    assert local.services == sorted(["gateway", "members", "accounts", "rules", "rewards", "notifications"])

    # 1. The migration hook Jobs, in Helm's order (weight, then name).
    jobs = sorted(find(manifests, "Job"), key=lambda job: (int(job.annotations["helm.sh/hook-weight"]), job.name))
    assert len(jobs) == len(local.services)
    for job in jobs:
        (container,) = job.pod_spec["containers"]
        env = local.localize(container_env(manifests, container, pod_name=f"{job.name}-local"))
        await local.run(job.name, local.command(container), env)

    # 2. Every Deployment, with the environment its pod would get.
    deployments = {component(d): d for d in find(manifests, "Deployment") if component(d) in local.services}
    for name, deployment in deployments.items():
        (container,) = deployment.pod_spec["containers"]
        env = local.localize(container_env(manifests, container, pod_name=f"{deployment.name}-0"))
        assert env["LOYALTY_AUTO_MIGRATE"] == "false", "the Jobs migrated; the services must not"
        local.start(name, local.command(container), env)

    # 3. Ready as the kubelet sees it: its gRPC readiness and liveness probes on the port
    # the server listens on (rendered as the container's port; here mapped to a free one).
    for name, deployment in deployments.items():
        (container,) = deployment.pod_spec["containers"]
        grpc_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "grpc")
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port
        await _wait_until_ready(local, name, container["readinessProbe"])
        assert await _probe(local.ports[name], container["livenessProbe"]["grpc"].get("service", "")) == (
            health_pb2.HealthCheckResponse.SERVING
        )

    # 4. The `helm test` pod: its init containers, then its containers, each to exit 0.
    (test_pod,) = find(manifests, "Pod")
    for container in [*test_pod.pod_spec.get("initContainers", []), *test_pod.pod_spec["containers"]]:
        env = local.localize(container_env(manifests, container, pod_name=test_pod.name))
        await local.run(f"{test_pod.name}/{container['name']}", local.command(container), env)

    # 5. What the ServiceMonitor would scrape answers.
    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    for name in local.services:
        body = await asyncio.to_thread(scrape, local.metrics_ports[name])
        assert "loyalty_grpc_server_requests_total" in body, name

    # 6. Stopped as a rollout stops a pod: SIGTERM, a clean exit within the grace period.
    grace = max(d.pod_spec["terminationGracePeriodSeconds"] for d in deployments.values())
    codes = await asyncio.to_thread(local.stop, grace)
    assert codes == dict.fromkeys(local.services, 0), {
        name: local.log_tail(name, 10) for name, code in codes.items() if code != 0
    }
