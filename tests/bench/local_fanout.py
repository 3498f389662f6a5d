#!/usr/bin/env python3
"""Local fan-out cost of an `outpost` binary: CPU per delivered message and memory per
subscription (ARCHITECTURE.md, "Local fan-out", has the figures and the command).

For each subscriber count K: a fresh gateway (upstream: a local mosquitto, so events drain),
K `mosquitto_sub` clients on `bench/#` (QoS 0), one `mosquitto_pub -l` sending RATE QoS 1
messages/s for SECONDS. The gateway's CPU time (utime + stime from /proc) is read around the
publishing; CPU per delivered message = (CPU with K − CPU with 0) / (K × messages), so ingest
and upstream work, the same in every run, cancel out. Every subscriber must receive every
message (`-C`), or the run fails.

Memory per subscription: one raw client subscribes to 10,000 distinct filters; the gateway's
VmRSS before and after, divided by 10,000.

Usage: local_fanout.py BINARY [--rate 2000] [--seconds 10] [--subs 0,1,10]
Needs Debian's mosquitto, mosquitto_pub and mosquitto_sub. Standard library only.
"""

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import time

from benchlib import cpu_seconds, free_port, rss_kib, upstream, wait_port


class Gateway:
    def __init__(self, binary, upstream_port):
        self.dir = tempfile.TemporaryDirectory()
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "run", "--listen", f"127.0.0.1:{self.port}", "--upstream",
             f"mqtt://127.0.0.1:{upstream_port}", "--data-dir", self.dir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.dir.cleanup()


def fan_out_run(binary, upstream_port, k, rate, seconds):
    gw = Gateway(binary, upstream_port)
    n = rate * seconds
    try:
        subs = [subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(gw.port), "-t", "bench/#",
                                  "-q", "0", "-C", str(n), "-i", f"bench-sub-{i}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(k)]
        time.sleep(0.5)  # The subscriptions are in place (mosquitto_sub has no readiness signal).
        pub = subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "-t", "bench/x",
                                "-q", "1", "-l", "-i", "bench-pub"], stdin=subprocess.PIPE)
        cpu0 = cpu_seconds(gw.proc.pid)
        start = time.monotonic()
        payload = b"{\"t\":21.5,\"seq\":%d}\n"
        for i in range(n):
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            pub.stdin.write(payload % i)
            if i % 64 == 0:
                pub.stdin.flush()
        pub.stdin.close()
        pub.wait(timeout=60)
        for s in subs:
            if s.wait(timeout=60) != 0:
                raise RuntimeError("a subscriber did not receive every message")
        cpu = cpu_seconds(gw.proc.pid) - cpu0
        return cpu, n
    finally:
        gw.stop()


def memory_run(binary, upstream_port, filters=10_000):
    gw = Gateway(binary, upstream_port)
    try:
        s = socket.create_connection(("127.0.0.1", gw.port))
        cid = b"bench-filters"
        var = struct.pack("!H", 4) + b"MQTT" + bytes([4, 2]) + struct.pack("!H", 60) + struct.pack("!H", len(cid)) + cid
        s.sendall(bytes([0x10, len(var)]) + var)
        s.recv(4)
        time.sleep(0.5)
        before = rss_kib(gw.proc.pid)
        out = bytearray()
        for i in range(filters):
            f = f"m/{i}/x/#".encode()
            body = struct.pack("!H", i % 65535 + 1) + struct.pack("!H", len(f)) + f + b"\x00"
            out += bytes([0x82, len(body)]) + body
        s.sendall(out)
        got, need = 0, 5 * filters  # A SUBACK with one code is 5 bytes.
        while got < need:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("the gateway closed the connection")
            got += len(chunk)
        after = rss_kib(gw.proc.pid)
        s.close()
        return before, after, filters
    finally:
        gw.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--subs", default="0,1,10")
    a = ap.parse_args()
    with upstream() as up_port:
        runs = {}
        for k in [int(x) for x in a.subs.split(",")]:
            cpu, n = fan_out_run(a.binary, up_port, k, a.rate, a.seconds)
            runs[k] = (cpu, n)
            print(f"{k:>3} subscribers: gateway CPU {cpu:.2f} s for {n} messages ({cpu / n * 1e6:.1f} µs/message)")
        base = runs.get(0)
        if base:
            for k, (cpu, n) in sorted(runs.items()):
                if k > 0:
                    extra = (cpu - base[0]) / (k * n) * 1e6
                    print(f"{k:>3} subscribers: fan-out {extra:.2f} µs of gateway CPU per delivered message")
        before, after, filters = memory_run(a.binary, up_port)
        print(f"memory: {filters} subscriptions, VmRSS {before} → {after} KiB, "
              f"{(after - before) * 1024 / filters:.0f} bytes per subscription")


if __name__ == "__main__":
    sys.exit(main())
