"""A separate-process HTTP client of the agent's /v1/events NDJSON stream, for
bench.event_throughput: it counts the lines it receives.

    python -m bench.ndjson_client URL TOKEN

Prints `ready` once the response headers arrived (the agent has subscribed it by then),
`first <json>` with the first event, then every 50 ms and at the end `lines <n> <t>`: lines
received so far and the CLOCK_MONOTONIC time (ns) of the last byte. Ends at the stream's
end or on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import threading
import time
from types import FrameType
from urllib.parse import urlsplit

REPORT_SECONDS = 0.05


class Counter:
    def __init__(self) -> None:
        self.lines = 0
        self.last_ns = 0
        self.lock = threading.Lock()

    def report(self) -> None:
        with self.lock:
            print(f"lines {self.lines} {self.last_ns}", flush=True)


def main() -> int:
    url, token = sys.argv[1], sys.argv[2]
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    if resp.status != 200:
        print(f"error {resp.status} {resp.read()[:200]!r}", flush=True)
        return 1
    print("ready", flush=True)
    counter = Counter()
    stop = threading.Event()

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        counter.report()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)

    def reporter() -> None:
        while not stop.wait(REPORT_SECONDS):
            counter.report()

    threading.Thread(target=reporter, daemon=True).start()
    partial = b""
    first = True
    while True:
        chunk = resp.read1(1 << 20)
        if not chunk:
            break
        now = time.monotonic_ns()
        newlines = chunk.count(b"\n")
        if first and newlines:
            line = (partial + chunk).split(b"\n", 1)[0]
            print(f"first {json.dumps(json.loads(line))}", flush=True)
            first = False
        partial = chunk.rsplit(b"\n", 1)[-1] if newlines else partial + chunk
        with counter.lock:
            counter.lines += newlines
            counter.last_ns = now
    stop.set()
    counter.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
