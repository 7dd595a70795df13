#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of moto server, for shiftd's tests.

moto answers every call correctly and at once; real EC2 throttles, runs out of capacity, answers
DescribeInstances from a slightly stale view, and lets an instance whose encrypted volume it cannot
decrypt fall back from pending to stopped. This proxy forwards every request to moto and, on request
of the test, does what moto does not:

  POST /_fault/error      {"action": "StartInstances", "instance": "i-..." (optional),
                           "status": 503, "code": "RequestLimitExceeded", "message": "...",
                           "times": 1 (default; -1 for always)}
      Answer matching requests with that error (in STS's format for STS actions, EC2's otherwise)
      instead of forwarding them.
  POST /_fault/error      {"action": "StopInstances", "delay": 25, "times": 1}
      Without "code": hold matching requests that long, then forward them (a hung endpoint; the
      request still takes effect, as a real one may after the client gave up).
  POST /_fault/body       {"action": "AssumeRole", "instance": "i-..." (optional), "status": 200,
                           "body": "<AssumeRoleResponse ...>...", "times": 1 (default; -1 for always)}
      Answer matching requests with that HTTP status and that body, verbatim, instead of forwarding
      them: a truncated or malformed answer, or an error page that is not the service's format.
  POST /_fault/fall-back  {"instance": "i-...", "code": "Client.InternalError",
                           "message": "Client.InternalError: Client error on launch"}
      After moto accepts a StartInstances naming the instance, stop it again in moto and show that
      state reason in DescribeInstances (the missing KMS grant case).
  POST /_fault/stale      {"instance": "i-...", "seconds": 3}
      For that long after a StartInstances/StopInstances naming the instance, DescribeInstances shows
      it as it was before the call (EC2's eventual consistency).
  GET  /_fault/seen       JSON array of the EC2/STS calls the proxy received, in order:
                          {"action", "instance_ids", "fault"} (fault: the injected error code, "delay",
                          "body", or null)

Usage: fault_proxy.py --upstream http://127.0.0.1:PORT --port-file FILE
"""

import argparse
import http.client
import json
import os
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

NS = "http://ec2.amazonaws.com/doc/2016-11-15"
ET.register_namespace("", NS)
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.errors = []  # dicts as posted, with "times" counting down
        self.bodies = []  # /_fault/body dicts as posted, with "times" counting down
        self.fall_back = {}  # instance -> (code, message)
        self.fell_back = set()  # instances stopped by the proxy
        self.stale_for = {}  # instance -> seconds
        self.stale_until = {}  # instance -> (deadline, (state, reason code, reason message))
        self.last_seen = {}  # instance -> (state, reason code, reason message) from describe responses
        self.seen = []

    def error_for(self, action, ids):
        return self._take(self.errors, action, ids)

    def body_for(self, action, ids):
        return self._take(self.bodies, action, ids)

    def _take(self, specs, action, ids):
        with self.lock:
            for e in specs:
                if e["action"] != action or e.get("times", 1) == 0:
                    continue
                if e.get("instance") and e["instance"] not in ids:
                    continue
                if e.get("times", 1) > 0:
                    e["times"] = e.get("times", 1) - 1
                return e
        return None


STS_ACTIONS = {"AssumeRole", "GetCallerIdentity", "GetSessionToken"}


def error_body(action, code, message):
    if action in STS_ACTIONS:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>fault-proxy</RequestId>"
            "</ErrorResponse>"
        ).encode()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        "<RequestID>fault-proxy</RequestID></Response>"
    ).encode()


def text(parent, tag):
    el = parent.find(f"{{{NS}}}{tag}")
    return el.text if el is not None else None


def set_state_reason(item, code, message):
    reason = item.find(f"{{{NS}}}stateReason")
    if reason is None:
        reason = ET.SubElement(item, f"{{{NS}}}stateReason")
    for child in list(reason):
        reason.remove(child)
    if code:
        ET.SubElement(reason, f"{{{NS}}}code").text = code
        ET.SubElement(reason, f"{{{NS}}}message").text = message or code


def rewrite_describe(faults, body):
    root = ET.fromstring(body)
    now = time.monotonic()
    with faults.lock:
        for items in root.iter(f"{{{NS}}}instancesSet"):
            for item in items.findall(f"{{{NS}}}item"):
                iid = text(item, "instanceId")
                state_el = item.find(f"{{{NS}}}instanceState")
                stale = faults.stale_until.get(iid)
                if stale and now < stale[0]:
                    state, code, message = stale[1]
                    state_el.find(f"{{{NS}}}code").text = str(STATE_CODES.get(state, 0))
                    state_el.find(f"{{{NS}}}name").text = state
                    set_state_reason(item, code, message)
                    continue
                if iid in faults.fell_back:
                    set_state_reason(item, *faults.fall_back[iid])
                reason = item.find(f"{{{NS}}}stateReason")
                faults.last_seen[iid] = (
                    text(state_el, "name"),
                    text(reason, "code") if reason is not None else None,
                    text(reason, "message") if reason is not None else None,
                )
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def make_handler(faults, upstream):
    up = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        server_version = "fault-proxy"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _reply(self, status, body, headers=(), content_type="text/xml"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                if k.lower() not in HOP_HEADERS and k.lower() != "content-type":
                    self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, method, body, headers=None):
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            headers = {k: v for k, v in (headers or self.headers).items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            conn.request(method, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            return resp.status, resp.getheaders(), data

        def _control(self, body):
            path = urlparse(self.path).path
            if self.command == "GET" and path == "/_fault/seen":
                with faults.lock:
                    return self._reply(200, json.dumps(faults.seen).encode(), content_type="application/json")
            spec = json.loads(body or b"{}")
            with faults.lock:
                if path == "/_fault/error":
                    faults.errors.append(spec)
                elif path == "/_fault/body":
                    faults.bodies.append(spec)
                elif path == "/_fault/fall-back":
                    faults.fall_back[spec["instance"]] = (
                        spec.get("code", "Client.InternalError"),
                        spec.get("message", "Client.InternalError: Client error on launch"),
                    )
                elif path == "/_fault/stale":
                    faults.stale_for[spec["instance"]] = float(spec.get("seconds", 3))
                else:
                    return self._reply(404, b"unknown control path", content_type="text/plain")
            self._reply(200, b"{}", content_type="application/json")

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/_fault/"):
                return self._control(body)
            form = parse_qs(body.decode(errors="replace")) if body else {}
            form.update(parse_qs(urlparse(self.path).query))
            action = (form.get("Action") or [None])[0]
            ids = [v[0] for k, v in sorted(form.items()) if k.startswith("InstanceId.")]
            canned = faults.body_for(action, ids) if action else None
            error = faults.error_for(action, ids) if action and not canned else None
            if action:
                with faults.lock:
                    fault = "body" if canned else error and error.get("code", "delay")
                    faults.seen.append({"action": action, "instance_ids": ids, "fault": fault})
            if canned:
                return self._reply(int(canned.get("status", 200)), canned.get("body", "").encode())
            if error and error.get("delay"):
                time.sleep(float(error["delay"]))
            if error and error.get("code"):
                return self._reply(int(error.get("status", 400)), error_body(action, error["code"], error.get("message", error["code"])))

            if action in ("StartInstances", "StopInstances"):
                with faults.lock:
                    before = {i: faults.last_seen.get(i) for i in ids if i in faults.stale_for}
            status, headers, data = self._forward(self.command, body)
            if status == 200 and action in ("StartInstances", "StopInstances"):
                now = time.monotonic()
                with faults.lock:
                    for iid, seen in before.items():
                        if seen:
                            faults.stale_until[iid] = (now + faults.stale_for.pop(iid), seen)
                    falling = [i for i in ids if action == "StartInstances" and i in faults.fall_back]
                    faults.fell_back.update(falling)
                for iid in falling:
                    stop = urlencode({"Action": "StopInstances", "Version": "2016-11-15", "InstanceId.1": iid}).encode()
                    self._forward("POST", stop, dict(self.headers))
            elif status == 200 and action == "DescribeInstances":
                data = rewrite_describe(faults, data)
            self._reply(status, data, headers, content_type=dict(headers).get("Content-Type", "text/xml"))

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    args = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(Faults(), args.upstream))
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
