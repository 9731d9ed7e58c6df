#!/usr/bin/env python3
"""Passes `cargo test` output through unchanged and, at the end, prints the slowest test
binaries (the time from each `Running`/`Doc-tests` line to the next) and the slowest
tests that libtest reported as running for over 60 seconds."""
import sys
import time

spans = []  # (seconds, name)
current, since = None, time.monotonic()
long_running = []
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
    text = line.strip()
    if text.startswith("Running ") or text.startswith("Doc-tests "):
        now = time.monotonic()
        if current:
            spans.append((now - since, current))
        current, since = text, now
    elif "has been running for over 60 seconds" in text:
        long_running.append(text)
if current:
    spans.append((time.monotonic() - since, current))
print("\n--- slowest test binaries (build time of the first one included)")
for seconds, name in sorted(spans, reverse=True)[:12]:
    print(f"{seconds:7.1f} s  {name}")
for text in long_running:
    print(f"   >60 s  {text}")
