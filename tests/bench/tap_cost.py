#!/usr/bin/env python3
"""What the tap's hooks cost the pipeline: gateway CPU per event at a fixed rate, the binary
before the tap (BEFORE) against the one with it (AFTER) with no viewer attached, and AFTER with
one `outpost tap`-like viewer attached that reads and discards everything (README, "Following
events", has the figures and the command).

Each run: a fresh gateway (bridge mode, upstream: one local mosquitto for all runs, so events
drain), then `outpost-sim fleet` (SENSORS sensors, QoS 1, RATE events/s in total, SECONDS
long). The gateway's CPU time (utime + stime of all threads, /proc) is read just before the
fleet starts and after it exits (every publish acknowledged); CPU per event = that CPU / events
the fleet had acknowledged. Runs alternate (before, after, tapped, before, …) so drifting
machine load hits all alike.

Usage: tap_cost.py BEFORE AFTER OUTPOST_SIM [--rate 10000] [--sensors 100] [--seconds 20]
                   [--rounds 2] [--no-tapped]
Needs Debian's mosquitto. Standard library only.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import fleet_cpu, free_port, print_summary, upstream, wait_port


class Viewer(threading.Thread):
    """Attaches to the admin socket's tap and reads everything until stopped."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.lines, self.missed = path, 0, 0
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.sendall(b"tap {}\n")
        self.file = self.sock.makefile("rb")
        hello = self.file.readline()
        if not hello.startswith(b'{"attached"'):
            raise RuntimeError(f"the tap answered {hello!r}")

    def run(self):
        for line in self.file:
            if line.startswith(b'{"missed"'):
                self.missed += json.loads(line)["missed"]
            else:
                self.lines += 1

    def stop(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join()


def wait_file(path, deadline=10.0):
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise RuntimeError(f"no {path}")
        time.sleep(0.02)  # Nothing to wait on but the file itself.


def run(outpost, sim, upstream_port, variant, rate, sensors, seconds):
    d = tempfile.TemporaryDirectory()
    listen = free_port()
    data = os.path.join(d.name, "data")
    gw = subprocess.Popen([outpost, "run", "--listen", f"127.0.0.1:{listen}", "--data-dir", data,
                           "--upstream", f"mqtt://127.0.0.1:{upstream_port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    viewer = None
    try:
        wait_port(listen)
        if variant == "tapped":
            sock = os.path.join(data, "outpost.sock")
            wait_file(sock)
            viewer = Viewer(sock)
            viewer.start()
        cpu, acked = fleet_cpu(sim, gw.pid, listen, rate, sensors, seconds, f"bench-{variant}-")
        seen = ""
        if viewer:
            viewer.stop()
            seen = f", viewer read {viewer.lines} records and missed {viewer.missed}"
        return cpu, acked, seen
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        d.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("outpost_sim")
    ap.add_argument("--rate", type=int, default=10000)
    ap.add_argument("--sensors", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-tapped", action="store_true")
    a = ap.parse_args()
    variants = [("before", a.before), ("after", a.after)]
    if not a.no_tapped:
        variants.append(("tapped", a.after))
    results = {v: [] for v, _ in variants}
    with upstream() as up_port:
        for round_no in range(a.rounds):
            for variant, binary in variants:
                cpu, n, seen = run(binary, a.outpost_sim, up_port, variant, a.rate, a.sensors, a.seconds)
                results[variant].append(cpu / n * 1e6)
                print(f"round {round_no + 1} {variant:>6}: gateway CPU {cpu:.2f} s for {n} events "
                      f"({cpu / n * 1e6:.2f} µs/event, {cpu / a.seconds * 100:.0f} % of a core){seen}",
                      flush=True)
    print_summary(results, 6)


if __name__ == "__main__":
    sys.exit(main())
