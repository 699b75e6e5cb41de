"""Calls per second through Kamailio with and without the callpolicy check, and the
INVITE->200 time the check adds.

    .venv/bin/python bench/bench_kamailio.py [--rates 200,400,...] [--seconds 5] [--latency-calls 300]

Each mode runs the shipped integrations/kamailio/kamailio.cfg on private loopback ports with a
sipp UAS behind it: "without" is the same config with -A POLICY_OFF (dialogs tracked, no check),
"with" has `callpolicy serve --evapi` connected (embedded store). Short calls (INVITE, 200, ACK,
BYE, 200; no hold) from a different user per call, so no cap refuses them; sipp -r is stepped up
until calls fail, time out or the achieved rate falls below 95 % of the target (a failed step
is run once more before it counts: the machine may be shared).

Latency: sequential calls from a Python UDP client, INVITE sent -> 200 received, timed with
perf_counter (sipp only reports whole milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.harness import HOST, SCENARIOS, Kamailio, Uas, missing_tools, run_uac, service_config  # noqa: E402
from tests.helpers import ServiceProcess  # noqa: E402


def bench_scenario(workdir: Path) -> str:
    """uac.xml with a From user per call (u1, u2, ...): no account or user cap is ever reached."""
    text = (SCENARIOS / "uac.xml").read_text().replace("[from_user]", "u[call_number]")
    path = workdir / "bench_uac.xml"
    path.write_text(text)
    return str(path)


def step_rates(kam: Kamailio, scenario: str, rates: list[int], seconds: float,
               retries: int = 1) -> list[dict[str, Any]]:
    """Run sipp at each rate until one fails (a failed step is tried `retries` more times, as the
    machine may be shared); return one row per run."""
    rows = []
    for rate in rates:
        for attempt in range(retries + 1):
            calls = int(rate * seconds)
            r = run_uac(kam.sip_port, scenario=scenario, calls=calls, rate=rate, hold_ms=0, service="100",
                        timeout=seconds * 4 + 10, recv_timeout_ms=5000, limit=rate * 2)
            ok = r.first_recv(200)
            achieved = float(r.stats.get("CallRate(C)", "0") or 0)
            failed = r.failed
            clean = not failed and ok == calls and r.rc == 0 and achieved >= 0.95 * rate
            row = {"rate": rate, "calls": calls, "answered": ok, "failed": failed, "attempt": attempt + 1,
                   "achieved_cps": round(achieved, 1), "wall_s": round(r.elapsed, 2), "rc": r.rc,
                   "clean": clean}
            rows.append(row)
            print(f"  r={rate:5d}: {ok}/{calls} answered, {failed} failed, achieved {achieved:.0f} calls/s"
                  + ("" if clean else f" (attempt {attempt + 1})"), flush=True)
            time.sleep(1.0)
            if clean:
                break
        if not rows[-1]["clean"]:
            break
    return rows


def one_call(sock: socket.socket, kam_port: int) -> float:
    """INVITE -> 200 -> ACK -> BYE -> 200; returns the INVITE->200 seconds."""
    lport = sock.getsockname()[1]
    call_id = f"{uuid.uuid4()}@{HOST}"
    tag = uuid.uuid4().hex[:8]
    user = "lat" + uuid.uuid4().hex[:8]
    ruri = f"sip:100@{HOST}:{kam_port}"
    frm = f"From: <sip:{user}@{HOST}>;tag={tag}"

    def via() -> str:
        return f"Via: SIP/2.0/UDP {HOST}:{lport};branch=z9hG4bK{uuid.uuid4().hex[:16]}"

    invite = (f"INVITE {ruri} SIP/2.0\r\n{via()}\r\n{frm}\r\nTo: <{ruri}>\r\nCall-ID: {call_id}\r\n"
              f"CSeq: 1 INVITE\r\nContact: <sip:{user}@{HOST}:{lport}>\r\nMax-Forwards: 70\r\n"
              "Content-Length: 0\r\n\r\n")
    t0 = time.perf_counter()
    sock.sendto(invite.encode(), (HOST, kam_port))
    while True:
        data = sock.recv(65535).decode(errors="replace")
        code = int(data.split(" ", 2)[1])
        if code >= 200:
            break
    t1 = time.perf_counter()
    if code != 200:
        raise RuntimeError(f"call refused: {data.splitlines()[0]}")
    headers = data.split("\r\n\r\n", 1)[0].split("\r\n")
    to_hdr = next(h for h in headers if h.lower().startswith("to:"))
    rr = [h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("record-route:")]
    contact = next(h for h in headers if h.lower().startswith("contact:")).split("<", 1)[1].split(">", 1)[0]
    route = "".join(f"Route: {r}\r\n" for r in rr)
    for method, cseq in (("ACK", 1), ("BYE", 2)):
        msg = (f"{method} {contact} SIP/2.0\r\n{via()}\r\n{route}{frm}\r\n{to_hdr}\r\nCall-ID: {call_id}\r\n"
               f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        sock.sendto(msg.encode(), (HOST, kam_port))
    while int(sock.recv(65535).decode(errors="replace").split(" ", 2)[1]) < 200:
        pass
    return t1 - t0


def latency(kam: Kamailio, calls: int) -> dict[str, float]:
    """Sequential calls; INVITE->200 in milliseconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(5)
        for _ in range(20):  # warm up
            one_call(sock, kam.sip_port)
        samples = sorted(one_call(sock, kam.sip_port) * 1000 for _ in range(calls))
    return {"median_ms": round(statistics.median(samples), 3),
            "p90_ms": round(samples[int(len(samples) * 0.9)], 3),
            "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3),
            "mean_ms": round(statistics.fmean(samples), 3), "calls": calls}


def run_mode(name: str, args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    """name: "without" (POLICY_OFF), "with" (evapi) or "kemi" (app_python3, blocking)."""
    print(f"== {name} the policy check" if name != "kemi" else "== with the check over app_python3",
          flush=True)
    uas = Uas(extra=["-l", "5000"]).start()
    svc = None
    if name == "kemi":
        svc = ServiceProcess(extra=["--log-level", "warning"]).start()
        script = ROOT / "integrations" / "kamailio" / "callpolicy_kemi.py"
        kam = Kamailio(uas.port, debug=1, children=args.children,
                       defines=["POLICY_KEMI", f'KEMI_SCRIPT="{script}"'],
                       env={"CALLPOLICY_SERVER": f"127.0.0.1:{svc.port}"}).start()
    else:
        kam = Kamailio(uas.port, debug=1, children=args.children,
                       defines=[] if name == "with" else ["POLICY_OFF"]).start()
    try:
        if name == "with":
            svc = ServiceProcess(extra=["--evapi", kam.evapi, "--log-level", "warning"])
            svc.config = service_config(svc.workdir)  # the evapi secret of the harness's Kamailio
            svc.start()
            kam.wait_clients(1)
        lat = latency(kam, args.latency_calls)
        print(f"  INVITE->200: median {lat['median_ms']} ms, p90 {lat['p90_ms']} ms, p99 {lat['p99_ms']} ms",
              flush=True)
        rows = step_rates(kam, scenario, args.rates, args.seconds)
    finally:
        if svc is not None:
            svc.stop()
        kam.stop()
        uas.stop()
    clean = [r for r in rows if r["clean"]]
    return {"mode": name, "latency": lat, "steps": rows,
            "max_clean_rate": max((r["rate"] for r in clean), default=0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,400,600,800,1000,1200,1400,1600,1800,2000,2500")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each rate step")
    ap.add_argument("--latency-calls", type=int, default=300)
    ap.add_argument("--children", type=int, default=4, help="Kamailio UDP workers")
    ap.add_argument("--modes", default="without,with",
                    help="comma list of: without (POLICY_OFF), with (evapi), kemi (app_python3)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.rates = [int(x) for x in args.rates.split(",")]
    why = missing_tools()
    if why:
        print(f"bench_kamailio: {why}", file=sys.stderr)
        return 2
    import tempfile

    scenario = bench_scenario(Path(tempfile.mkdtemp(prefix="bench-kamailio-")))
    results = [run_mode(m, args, scenario) for m in args.modes.split(",")]
    by = {r["mode"]: r for r in results}
    added = None
    if "without" in by and "with" in by:
        added = round(by["with"]["latency"]["median_ms"] - by["without"]["latency"]["median_ms"], 3)
    print("\n== summary")
    print(f"cpus: {os.cpu_count()}, Kamailio UDP workers: {args.children}, steps of {args.seconds:g} s")
    for r in results:
        print(f"{r['mode']:>8}: max clean rate {r['max_clean_rate']} calls/s, INVITE->200 median "
              f"{r['latency']['median_ms']} ms (p99 {r['latency']['p99_ms']} ms)")
    if added is not None:
        print(f"added INVITE->200 (median, evapi): {added} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "added_median_ms": added}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
