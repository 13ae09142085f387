"""The synthetic-data generator's own overhead: tools.synthesize's client against a local teacher that answers at
once (tests/teacher_server.py, a separate process on 127.0.0.1), so what limits the rate is the generator.

    python -m tools.bench_synthesize [--items=4000] [--concurrency=256] [--latency=0,1.0] [--out=bench/synth.json]

Per teacher latency: completed requests/s, the peak in flight, and this process's CPU seconds per request (the
openai client, the plan, the journal's batched fsynced appends), besides the server's CPU time.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tools._bench import command, machine, print_table, write_json

TEMPLATE = 'name = "bench"\nprompt = "Write about {topic}."\n[sampling]\nmax_tokens = 64\n'


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--latency", default="0,1.0", help="the teacher's seconds per answer, comma-separated")
    p.add_argument("--out", default="bench/synthesize.json")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from teacher_server import Server

    from phi_jax.datagen.plan import Plan
    from phi_jax.datagen.synthesize import synthesize
    from phi_jax.datagen.template import load_template

    rows = []
    for latency in [float(x) for x in a.latency.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            template = Path(tmp) / "bench.toml"
            template.write_text(TEMPLATE)
            plan = Plan(load_template(str(template)), [{"topic": f"subject {i}"} for i in range(a.items)])
            with Server(latency=latency) as server:
                server_cpu = cpu_seconds(server.proc.pid)
                start = time.perf_counter()
                s = synthesize(plan, Path(tmp) / "out", base_url=server.base_url, model="bench",
                               concurrency=a.concurrency, progress_every=1e9)
                wall = time.perf_counter() - start
                server_cpu = cpu_seconds(server.proc.pid) - server_cpu
        rows.append({"teacher_latency_s": latency, "items": s["completed"], "concurrency": a.concurrency,
                     "peak_in_flight": s["peak_in_flight"], "wall_s": round(wall, 2),
                     "requests_per_s": round(s["completed"] / wall, 1),
                     "client_cpu_ms_per_request": round(1000 * s["cpu_seconds_per_request"], 3),
                     "server_cpu_ms_per_request": round(1000 * server_cpu / max(s["requests"], 1), 3),
                     "failed": s["failed"]})
    print_table("tools.synthesize against a local teacher (one client process)", rows)
    write_json(a.out, {"command": command(__file__, argv), "machine": machine(),
                       "date": time.strftime("%Y-%m-%d"), "rows": rows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
