"""A real S3 endpoint for the tests: moto's server on 127.0.0.1 behind the fault-injecting proxy
of ``tools.bench.endpoint`` (throttling, a body cut off, a flipped byte, access denied), and the
environment a client finds it through (nothing from the machine's own AWS settings)."""

from __future__ import annotations

import itertools

import pytest

from moco_dali.tools.bench.endpoint import Endpoint, start_moto
from tests.conftest import free_port

_buckets = itertools.count()


@pytest.fixture(scope="module")
def moto_server():
    """moto's S3 server on 127.0.0.1 for one test module (it starts in about a second): its
    threads end with the module, so no later test forks a process beside them."""
    server, address = start_moto(free_port())
    yield address
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch, tmp_path):
    """A fresh bucket on the endpoint, reached through the fault proxy: ``(bucket, faults)``."""
    endpoint = Endpoint(moto_server)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    bucket = f"moco-test-{next(_buckets)}"
    endpoint.make_bucket(bucket)
    yield bucket, endpoint.faults
    endpoint.close()
