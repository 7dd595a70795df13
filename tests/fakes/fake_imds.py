#!/usr/bin/env python3
"""A small fake of the EC2 instance metadata service (IMDSv2), for shiftd's tests and demo.

moto's own IMDS does not answer the token request with the TTL header aws-config requires, so shiftd
brings this one. It serves:

  PUT  /latest/api/token                               IMDSv2 session token (TTL header echoed)
  GET  /latest/meta-data/instance-id                   the delegate instance's ID
  GET  /latest/meta-data/iam/security-credentials/     the instance profile's role name
  GET  /latest/meta-data/iam/security-credentials/R    that role's temporary credentials

GET requests without a valid token are refused (401), as IMDSv2-only instances do.

Control endpoints for tests (not part of IMDS):

  POST /_fake/outage?seconds=N     answer every IMDS request with 503 for N seconds (0 ends it)
  POST /_fake/expiry?seconds=N     credentials handed out from now on expire N seconds after issue
  POST /_fake/role?name=R          change the role name (empty: no instance profile, 404)
  GET  /_fake/stats                JSON counters: tokens, credentials fetches, refused requests

The credentials are for moto's default account (123456789012), the delegate in the tests.
"""

import argparse
import json
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

STATE_LOCK = threading.Lock()


class State:
    def __init__(self, role, expiry_seconds, instance_id):
        self.role = role
        self.expiry_seconds = expiry_seconds
        self.instance_id = instance_id
        self.outage_until = 0.0
        self.tokens = {}
        self.stats = {"tokens": 0, "credentials": 0, "refused": 0}


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        server_version = "fake-imds"

        def log_message(self, fmt, *args):  # quiet: the tests read stats instead
            pass

        def _send(self, code, body="", headers=None, content_type="text/plain"):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _in_outage(self):
            with STATE_LOCK:
                if time.time() < state.outage_until:
                    state.stats["refused"] += 1
                    return True
            return False

        def do_PUT(self):
            if self._in_outage():
                return self._send(503, "service unavailable (fake outage)")
            if urlparse(self.path).path != "/latest/api/token":
                return self._send(404, "not found")
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            if not ttl or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self._send(400, "missing or invalid TTL header")
            token = secrets.token_urlsafe(32)
            with STATE_LOCK:
                state.tokens[token] = time.time() + int(ttl)
                state.stats["tokens"] += 1
            self._send(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})

        def do_POST(self):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            with STATE_LOCK:
                if url.path == "/_fake/outage":
                    state.outage_until = time.time() + float(q.get("seconds", "0"))
                elif url.path == "/_fake/expiry":
                    state.expiry_seconds = int(q["seconds"])
                elif url.path == "/_fake/role":
                    state.role = q.get("name", "")
                else:
                    return self._send(404, "not found")
            self._send(200, "ok")

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/_fake/stats":
                with STATE_LOCK:
                    body = json.dumps(state.stats)
                return self._send(200, body, content_type="application/json")
            if self._in_outage():
                return self._send(503, "service unavailable (fake outage)")
            token = self.headers.get("X-aws-ec2-metadata-token")
            with STATE_LOCK:
                valid = token is not None and state.tokens.get(token, 0) > time.time()
            if not valid:
                return self._send(401, "unauthorized: IMDSv2 token required")
            base = "/latest/meta-data/iam/security-credentials/"
            if url.path == "/latest/meta-data/instance-id":
                return self._send(200, state.instance_id)
            if url.path == base:
                if not state.role:
                    return self._send(404, "not found")
                return self._send(200, state.role)
            if url.path.startswith(base) and state.role and url.path[len(base):] == state.role:
                now = datetime.now(timezone.utc)
                with STATE_LOCK:
                    state.stats["credentials"] += 1
                    expiry = state.expiry_seconds
                body = {
                    "Code": "Success",
                    "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "ASIAFAKEIMDS" + secrets.token_hex(4).upper(),
                    "SecretAccessKey": secrets.token_urlsafe(30),
                    "Token": secrets.token_urlsafe(60),
                    "Expiration": (now + timedelta(seconds=expiry)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                return self._send(200, json.dumps(body), content_type="application/json")
            self._send(404, "not found")

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--role", default="shiftd-delegate", help="instance profile role name ('' for none)")
    p.add_argument("--expiry-seconds", type=int, default=6 * 3600, help="lifetime of the credentials")
    p.add_argument("--instance-id", default="i-0de1e6a7e0000cafe", help="the delegate instance's ID")
    p.add_argument("--port-file", help="write the chosen port to this file once listening")
    args = p.parse_args()
    state = State(args.role, args.expiry_seconds, args.instance_id)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state))
    port = server.server_address[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(port))
        import os

        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"fake IMDS listening on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
