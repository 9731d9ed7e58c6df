"""Signs a LiveKit webhook body with LiveKit's own server SDK (`pip install livekit-api`).

Reads the body on stdin and prints the `Authorization` token LiveKit sends with it: an
HS256 JWT whose issuer is the API key and whose `sha256` claim is the body's digest, as
the LiveKit server makes it. Usage: livekit_sign.py API_KEY API_SECRET < body
"""

import base64
import hashlib
import sys

from livekit import api


def main() -> None:
    key, secret = sys.argv[1], sys.argv[2]
    body = sys.stdin.buffer.read()
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    token = api.AccessToken(key, secret).with_sha256(digest).to_jwt()
    # The SDK's own receiver accepts it: what sessiond is tested against is what LiveKit
    # sends.
    verifier = api.TokenVerifier(key, secret)
    api.WebhookReceiver(verifier).receive(body.decode(), token)
    sys.stdout.write(token)


if __name__ == "__main__":
    main()
