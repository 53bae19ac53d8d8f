"""Run every benchmark in bench/ and rewrite the figures table in docs/benchmarks.md.

Each ``bench/<name>.py`` prints one JSON object.  The table lists every figure with its target and the
reTHINK anchor it is compared with (both known here, in FIGURES), the date and the machine.  Text outside the
markers in docs/benchmarks.md (the analysis) is left alone.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"

#: figure -> (target, reTHINK anchor); figures not listed are shown with blanks.
FIGURES: dict[str, tuple[str, str]] = {
    "local_deliveries_per_s": ("≥ 1,000,000", "≈ 3,000,000 (JS MessageBus, Node.js, this machine kind)"),
    "resolved_deliveries_per_s": ("", "≈ 500,000 (JS MessageBus resolving to a stub)"),
    "request_roundtrips_per_s": ("≥ 100,000", ""),
    "decode_validate_per_s": ("≥ 500,000", ""),
    "descriptor_requests_per_s": ("≥ 5,000", "≈ 1,350 (reTHINK catalogue, saturated, own testbed)"),
    "fetch_verify_ms_p50_cold": ("≤ 2 ms", "no verification at all"),
    "fetch_verify_ms_p50_cached": ("≤ 0.5 ms", ""),
    "start_to_created_ms_p50": ("≤ 100 ms", "no process isolation"),
    "channel_roundtrips_per_s": ("≥ 20,000", ""),
    "idle_stub_rss_mb": ("≤ 30 MB", ""),
    "cold_deploy_ms_p50": ("≤ 100 ms (goal: < 23 ms)", "18-23 ms without download and isolation"),
    "cold_deploy_ms_p95": ("", ""),
    "warm_load_us_p50": ("", ""),
    "roundtrip_ms_p50": ("≤ 1.48 ms", "1.48 ms (Node.js node + 2 stubs, no isolation)"),
    "roundtrip_ms_p50_2_nodes": ("< 1 ms (across nodes)", "no working cluster (Vert.x: re-open on another node fails)"),
    "roundtrip_ms_p50_3_nodes": ("< 1 ms (across nodes)", ""),
    "failover_lost": ("0", "sessions lost with their node"),
    "roundtrip_ms_p99": ("≤ 2.35 ms", "2.35 ms"),
    "oneway_msgs_per_s_100b": ("≥ 28,755", "28,755 msg/s"),
    "oneway_msgs_per_s_10kb": ("≥ 2,276", "2,276 msg/s"),
    "fanout_1000_ms": ("", "failed on every reTHINK node"),
    "fanout_1000_lost": ("0", "failed"),
    "cold_deploy_js_ms_p50": ("< 100 ms", "18-23 ms without download and isolation"),
}

#: Further runs of a script with arguments: script stem -> [(name in the table, arguments)].
#: ``e2e --js``: reTHINK's own JavaScript stub (in a Node host) on runtime A's side.
VARIANTS: dict[str, list[tuple[str, list[str]]]] = {"e2e": [("e2e_js", ["--js"])]}


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"
    )


def run(script: Path, args: list[str] | None = None) -> dict[str, object]:
    command = [sys.executable, str(script), *(args or [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{script.name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, object]]) -> str:
    date = datetime.date.today().isoformat()
    lines = [
        f"Measured {date} on {machine()}.",
        "",
        "| bench | figure | value | target | reTHINK anchor |",
        "|---|---|---|---|---|",
    ]
    for name, figures in results.items():
        for key, value in figures.items():
            target, anchor = FIGURES.get(key, ("", ""))
            shown = f"{value:,}" if isinstance(value, int) else value
            lines.append(f"| {name} | `{key}` | {shown} | {target} | {anchor} |")
    return "\n".join(lines)


def main() -> None:
    only = set(sys.argv[1:])
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "run_all.py")
    results = {}
    for script in scripts:
        if only and script.stem not in only:
            continue
        print(f"running {script.name} ...", flush=True)
        results[script.stem] = run(script)
        print(json.dumps(results[script.stem]), flush=True)
        for name, args in VARIANTS.get(script.stem, []):
            print(f"running {script.name} {' '.join(args)} ...", flush=True)
            results[name] = run(script, args)
            print(json.dumps(results[name]), flush=True)
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{table(results)}\n{END}{tail}")
    print(f"updated {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
