"""An S3-compatible server for the store tests: moto's, on a free loopback port.

    python tests/s3_server.py BUCKET

Creates BUCKET, prints `endpoint http://127.0.0.1:<port>` on one line, and serves until its
standard input closes (the test that started it ended), so that no server outlives a test.
"""
import contextlib
import io
import os
import sys
import urllib.request

os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from moto.server import ThreadedMotoServer  # noqa: E402


def main():
    bucket = sys.argv[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # moto announces itself on stdout, which carries only our one line.
    with contextlib.redirect_stdout(io.StringIO()):
        server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=30)
    print(f"endpoint {endpoint}", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
