#!/usr/bin/env python3
"""What the HTTP endpoint costs the pipeline: gateway CPU per event at a fixed rate with a
scraper reading /metrics every second, against the same run without the endpoint (README,
"Metrics and health", has the figures and the command).

Each run: a fresh gateway (upstream: one local mosquitto for all runs, so events drain), then
`outpost-sim fleet` (SENSORS sensors, QoS 1, 200-byte JSON, RATE events/s in total, SECONDS
long). The gateway's CPU time (utime + stime of all threads, /proc) is read just before the
fleet starts and after it exits (every publish acknowledged); CPU per event = that CPU / events
the fleet had acknowledged. Variants:

- `none`: no [http] table (the endpoint is off).
- `scraped`: [http] on loopback, and a scraper GETs /metrics once a second during the run
  (it checks every answer is a 200 with `outpost_messages_received_total` in it).
- `idle` (with --idle): [http] on, nobody scrapes (the 1 s status sampler alone).

Runs alternate (none, scraped, none, scraped, …) so drifting machine load hits both alike.

Usage: http_scrape.py OUTPOST OUTPOST_SIM [--rate 10000] [--sensors 100] [--seconds 20]
                      [--rounds 2] [--idle]
Needs Debian's mosquitto. Standard library only.
"""

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading

from benchlib import fleet_cpu, free_port, print_summary, upstream, wait_port


class Scraper(threading.Thread):
    """GET /metrics once a second until stopped; counts answers and refuses bad ones."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.stop, self.scrapes, self.errors = port, threading.Event(), 0, []

    def run(self):
        while not self.stop.wait(1.0):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                if response.status != 200 or b"outpost_messages_received_total" not in body:
                    self.errors.append(f"status {response.status}")
                self.scrapes += 1
            except OSError as e:
                self.errors.append(str(e))


def run(outpost, sim, upstream_port, variant, rate, sensors, seconds):
    d = tempfile.TemporaryDirectory()
    listen, http_port = free_port(), free_port()
    config = os.path.join(d.name, "outpost.toml")
    with open(config, "w") as f:
        f.write(f"[upstream]\nurl = \"mqtt://127.0.0.1:{upstream_port}\"\n")
        if variant != "none":
            f.write(f"[http]\nlisten = \"127.0.0.1:{http_port}\"\n")
    gw = subprocess.Popen([outpost, "run", "--config", config, "--listen", f"127.0.0.1:{listen}",
                           "--data-dir", os.path.join(d.name, "data")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scraper = None
    try:
        wait_port(listen)
        if variant == "scraped":
            scraper = Scraper(http_port)
            scraper.start()
        cpu, acked = fleet_cpu(sim, gw.pid, listen, rate, sensors, seconds, f"bench-{variant}-")
        if scraper:
            scraper.stop.set()
            scraper.join()
            if scraper.errors:
                raise RuntimeError(f"scrapes failed: {scraper.errors[:3]}")
        return cpu, acked, scraper.scrapes if scraper else 0
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        d.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outpost")
    ap.add_argument("outpost_sim")
    ap.add_argument("--rate", type=int, default=10000)
    ap.add_argument("--sensors", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--idle", action="store_true")
    a = ap.parse_args()
    variants = ["none", "scraped"] + (["idle"] if a.idle else [])
    results = {v: [] for v in variants}
    with upstream() as up_port:
        for round_no in range(a.rounds):
            for variant in variants:
                cpu, n, scrapes = run(a.outpost, a.outpost_sim, up_port, variant, a.rate, a.sensors, a.seconds)
                results[variant].append(cpu / n * 1e6)
                print(f"round {round_no + 1} {variant:>7}: gateway CPU {cpu:.2f} s for {n} events "
                      f"({cpu / n * 1e6:.2f} µs/event, {cpu / a.seconds * 100:.0f} % of a core), "
                      f"{scrapes} scrapes", flush=True)
    print_summary(results, 7)


if __name__ == "__main__":
    sys.exit(main())
