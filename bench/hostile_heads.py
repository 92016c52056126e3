"""What huge request heads from a client without a key do to a running service: a 32 MB header,
then two 100 MB ones at once, while /livez is polled. Prints each answer and its time, and the
slowest /livez meanwhile.

    .venv/bin/python bench/hostile_heads.py --port 8000   # against `reasoning-agent serve`
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
import urllib.request


def send_huge_header(port: int, megabytes: int) -> tuple[str, float]:
    """The status line that came back (or the error), and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: "
            sock.sendall(head + b"a" * (megabytes << 20) + b"\r\n\r\n")
            reply = sock.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError as exc:
            reply = exc.__class__.__name__
    return reply, round(time.monotonic() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    stop, latencies, errors = threading.Event(), [], []

    def poll() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/livez", timeout=30).read()
                latencies.append(time.monotonic() - started)
            except OSError as exc:
                errors.append(exc.__class__.__name__)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        print("32 MB header:", send_huge_header(args.port, 32))
        replies: list[tuple[str, float]] = []
        senders = [
            threading.Thread(target=lambda: replies.append(send_huge_header(args.port, 100)))
            for _ in range(2)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        print("2 x 100 MB headers:", replies)
    finally:
        stop.set()
        poller.join()
    slowest = max(latencies, default=float("nan"))
    print(f"/livez meanwhile: {len(latencies)} answered, slowest {slowest:.3f} s, errors {errors}")


if __name__ == "__main__":
    main()
