"""A local S3 server for tests: moto's server mode on 127.0.0.1, on a free port.

server, endpoint = start_moto_server()
try:
    for k, v in moto_env(endpoint).items(): monkeypatch.setenv(k, v)
    create_bucket(endpoint, "my-bucket")
    ...
finally:
    server.stop()
"""

from __future__ import annotations

from typing import Any


def start_moto_server() -> tuple[Any, str]:
    """Start moto's S3 server on 127.0.0.1 (free port); return (server, endpoint URL). Stop: server.stop()."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def moto_env(endpoint: str) -> dict[str, str]:
    """Environment pointing boto3, pyarrow and fabdistill.storage at the local server, dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def create_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
