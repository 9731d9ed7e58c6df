"""A webhook receiver for the outbound-webhook tests: every delivery is verified with the
Standard Webhooks reference library (`standardwebhooks` on PyPI), not with sessiond's code.

Usage: webhook_receiver.py LOG SECRETS MODE
  LOG      a file; one JSON line per request received
  SECRETS  comma-separated whsec_ secrets; a delivery verifies if any one of them does
  MODE     ok | fail-until:<unix seconds> | always:<status> | redirect:<url>
Prints "listening <port>" once it serves (on 127.0.0.1, a free port).
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

LOG, SECRETS, MODE = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
HOOKS = [Webhook(s) for s in SECRETS if s]
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified, error, payload = False, None, None
        for hook in HOOKS:
            try:
                payload = hook.verify(body, headers)
                verified = True
                break
            except WebhookVerificationError as e:
                error = str(e)
        status, location = 204, None
        if MODE.startswith("fail-until:") and time.time() < float(MODE.split(":", 1)[1]):
            status = 500
        elif MODE.startswith("always:"):
            status = int(MODE.split(":", 1)[1])
        elif MODE.startswith("redirect:"):
            status, location = 307, MODE.split(":", 1)[1]
        line = {
            "path": self.path,
            "id": headers.get("webhook-id"),
            "timestamp": headers.get("webhook-timestamp"),
            "signatures": len(headers.get("webhook-signature", "").split(" ")),
            "verified": verified,
            "error": None if verified else error,
            "answered": status,
            "received_at": time.time(),
            "body": payload,
        }
        with LOCK:
            with open(LOG, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.send_response(status)
        if location:
            self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
