"""What the benchmark scripts in this folder share: free ports, waiting for a listener, a
process's CPU time and memory from /proc, a throwaway local mosquitto, and a fleet run that
measures a gateway's CPU per acknowledged event. Standard library only.
"""

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)  # Nothing to wait on but the port itself.
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid):
    """utime + stime of every thread of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def upstream():
    """A local mosquitto on a free port for the length of a `with`: yields its port."""
    proc, port, d = mosquitto()
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait()
        d.cleanup()


def fleet_cpu(sim, pid, listen, rate, sensors, seconds, prefix):
    """Runs `outpost-sim fleet` (SENSORS QoS 1 sensors, RATE events/s in total) against the
    gateway `pid` listening on port `listen`, and returns (the gateway's CPU seconds meanwhile,
    events acknowledged). Raises unless every publish was acknowledged."""
    cpu0 = cpu_seconds(pid)
    fleet = subprocess.run(
        [sim, "fleet", "--broker", f"127.0.0.1:{listen}", "--sensors", str(sensors),
         "--rate", str(rate / sensors), "--duration", f"{seconds}s", "--qos", "1",
         "--client-prefix", prefix],
        capture_output=True, check=True, text=True)
    cpu = cpu_seconds(pid) - cpu0
    counts = json.loads(fleet.stdout)
    if counts["acked"] < counts["sent"]:
        raise RuntimeError(f"only {counts['acked']} of {counts['sent']} publishes acknowledged")
    return cpu, counts["acked"]


def print_summary(results, width):
    """One line per variant: its µs/event of every round."""
    for variant, runs in results.items():
        print(f"{variant:>{width}}: {', '.join(f'{x:.2f}' for x in runs)} µs/event")


def mosquitto():
    """A local mosquitto on a free port: (process, port, its TemporaryDirectory)."""
    d = tempfile.TemporaryDirectory()
    port = free_port()
    conf = os.path.join(d.name, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port, d
