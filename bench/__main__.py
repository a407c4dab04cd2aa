"""python -m bench [overhead speed lifecycle routing migration multimodal] [--quick] | --render:
run benchmarks (all by default), write bench/out/<suite>.json, and rebuild bench/RESULTS.md from
every suite's latest JSON (so running one suite keeps the others' last results, each with the
command that made it)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from . import common, lifecycle, migration, multimodal, overhead, routing, speed
from .common import OUT, RESULTS_MD, machine

SUITES: dict[str, Callable[[bool], dict[str, Any]]] = {
    "overhead": overhead.run,
    "speed": speed.run,
    "lifecycle": lifecycle.run,
    "routing": routing.run,
    "migration": migration.run,
    "multimodal": multimodal.run,
}
TITLES = {
    "overhead": "1. Overhead: our worker against raw AsyncLLM and vllm serve (real vLLM, demo model)",
    "speed": "2. Speed of light: synthetic engine, zero step time, worker on one core",
    "lifecycle": "3. Recovery and lifecycle",
    "routing": "4. Routing quality at scale (simulated workers, the frontend's router)",
    "migration": "5. Migration under chaos (frontend, synthetic workers, one killed every 5 s)",
    "multimodal": "6. Multimodal: the embedding chain against one aggregated LLaVA worker (real vLLM, tiny LLaVA)",
}


def _table(result: dict[str, Any]) -> list[str]:
    lines = ["| metric | n | p50 | p99 | mean | max |", "|---|---|---|---|---|---|"]
    for metric, s in result.items():
        if isinstance(s, dict) and "p50" in s:
            lines.append(f"| {metric} | {s['n']} | {s['p50']} | {s['p99']} | {s['mean']} | {s['max']} |")
    return lines


def _lifecycle_md(result: dict[str, Any]) -> list[str]:
    lines = ["Times in ms (restart_in_process in us). Restarts: kill -> ready from the worker's own log. "
             "SIGTERM runs: 8 streams in flight that outlast the grace period "
             f"({result.get('details', {}).get('grace_period_s', '?')} s here), so they are aborted with a "
             "migratable error after it. Engine SIGKILL: the vLLM EngineCore, with 8 streams in flight. "
             "vLLM runs use the default worker (demo model).", ""]
    lines += _table(result)
    details = result.get("details")
    if details:
        kills = details.get("engine_kill", [])
        terms = details.get("sigterm_vllm", [])
        got = sorted(set(details.get("sigterm_synthetic_outcomes", [])) | {o for t in terms for o in t["outcomes"]})
        lines += ["", f"Engine SIGKILL: exit statuses {sorted({k['status'] for k in kills})}; the 8 clients got "
                      f"{sorted({o for k in kills for o in k['outcomes']})}. SIGTERM: exit statuses "
                      f"{details.get('sigterm_synthetic_status')} (synthetic), {sorted({t['status'] for t in terms})} "
                      f"(vLLM); the clients got {got}."]
    return lines


MARKDOWN: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "overhead": overhead.markdown,
    "speed": speed.markdown,
    "lifecycle": _lifecycle_md,
    "routing": routing.markdown,
    "migration": migration.markdown,
    "multimodal": multimodal.markdown,
}


def _aims(results: dict[str, dict[str, Any]]) -> list[str]:
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**missed**")

    ov = results.get("overhead", {}).get("table")
    if ov:
        for level in ("8", "32"):
            row = ov.get(level, {})
            for v in ("tcp", "http"):
                agg = row.get(v)
                if not agg:
                    continue
                serve = row.get("serve", {}).get("tok_s")
                ratio = agg.get("tok_s_ratio")
                beats = serve is None or agg["tok_s"] > serve
                rows.append((f"throughput {overhead.LABELS[v]}, {level} streams: >= 0.95 x (a) and > (d)",
                             f"{ratio} x (a); {agg['tok_s']} vs {serve} tok/s (d)",
                             verdict(ratio is not None and ratio >= 0.95 and beats)))
        probe = ov.get("ttft", {})
        for v in ("tcp", "http"):
            agg = probe.get(v)
            base = probe.get("raw", {})
            if agg and "ttft_over_engine_mean_ms" in agg:
                added = agg["ttft_over_engine_mean_ms"] - base.get("ttft_over_engine_mean_ms", 0.0)
                rows.append((f"added TTFT {overhead.LABELS[v]} (ttft probe): < 2 ms p50",
                             f"{added:.2f} ms: TTFT over vLLM's own {agg['ttft_over_engine_mean_ms']} ms, less "
                             f"(a)'s {base.get('ttft_over_engine_mean_ms', '-')} ms (same-engine means); across "
                             f"engine starts p50 - (a)'s p50: {agg.get('ttft_added_p50_ms')} ms",
                             verdict(added < 2.0)))
    sp = results.get("speed", {}).get("best")
    if sp:
        for t, best in sp.items():
            rows.append((f"speed of light over {t.upper()}: >= 50,000 tok/s per core",
                         f"{best['tok_s_per_worker_core']} tok/s per core ({best['worker_cpu_us_per_token']} us/token, "
                         f"{best['streams']} streams)", verdict(best["tok_s_per_worker_core"] >= 50_000)))
    lc = results.get("lifecycle", {})
    for key in ("restart_health_ms", "restart_listener_ms"):
        if key in lc:
            rows.append((f"{key.removesuffix('_ms')} p50: < 20 ms", f"{lc[key]['p50']} ms (p99 {lc[key]['p99']})",
                         verdict(lc[key]["p50"] < 20)))
    if lc.get("engine_sigkill_to_exit_ms", {}).get("n"):
        s = lc["engine_sigkill_to_exit_ms"]
        rows.append(("engine death -> exit: < 6 s", f"p50 {s['p50']} ms, max {s['max']} ms", verdict(s["max"] < 6000)))
    rt = results.get("routing", {}).get("table")
    if rt:
        for n, t in rt.items():
            rows.append((f"kv routing, {n} workers: TTFT p50 cut >= 30% against round-robin",
                         f"{t['ttft_p50_cut']:.0%} (p99 {t['ttft_p99_cut']:.0%})", verdict(t["ttft_p50_cut"] >= 0.3)))
            rows.append((f"router cost, {n} workers: < 0.5 ms p99", f"{t['router_p99_us']} us",
                         verdict(t["router_p99_us"] < 500)))
    mg = results.get("migration")
    if mg:
        rows.append(("migration under chaos: every stream intact", f"{mg['intact_share']:.1%} of {mg['requests']} "
                     f"({mg['outcomes']['wrong']} wrong, {mg['outcomes']['error']} errors, {mg['kills']} kills)",
                     verdict(mg["outcomes"]["wrong"] == 0 and mg["outcomes"]["error"] == 0)))
    if not rows:
        return []
    return ["## Aims", "", "| aim | reached | |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""]


def _load(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _before_after(results: dict[str, dict[str, Any]]) -> list[str]:
    """The same benchmarks with the worker run from a checkout without this work's fixes
    (BENCH_WORKER_TREE, written to <suite>-before.json), next to the current results."""
    lines: list[str] = []
    sp_before, sp_after = _load("speed-before"), results.get("speed")
    if sp_before and sp_after:
        lines += ["### Speed of light, before and after", "",
                  f"Before: `{sp_before.get('command')}` with the worker from `{sp_before.get('worker_tree')}` "
                  f"at {sp_before['machine']['date']}.", "",
                  "| transport | streams | before: worker CPU us/token | before: tok/s per core "
                  "| after: worker CPU us/token | after: tok/s per core |", "|---|---|---|---|---|---|"]
        after = {(r["transport"], r["streams"]): r for r in sp_after["results"]}
        for r in sp_before["results"]:
            a = after.get((r["transport"], r["streams"]))
            if a:
                lines.append(f"| {r['transport']} | {r['streams']} | {r['worker_cpu_us_per_token']} "
                             f"| {r['tok_s_per_worker_core']} | {a['worker_cpu_us_per_token']} "
                             f"| {a['tok_s_per_worker_core']} |")
        tb = {t["transport"]: t for t in sp_before.get("ttft", [])}
        for t in sp_after.get("ttft", []):
            if t["transport"] in tb:
                lines.append(f"\nTree's own TTFT p50 over {t['transport']}: {tb[t['transport']]['ttft_p50_ms']} ms "
                             f"before, {t['ttft_p50_ms']} ms after.")
        lines.append("")
    ov_before, ov_after = _load("overhead-before"), results.get("overhead")
    if ov_before and ov_after:
        lines += ["### Overhead on real vLLM, before and after", "",
                  f"Before: `{ov_before.get('command')}` with the worker from `{ov_before.get('worker_tree')}`, "
                  f"{ov_before['rounds']} round(s), variants {ov_before.get('variants')}, at "
                  f"{ov_before['machine']['date']} (a separate run: compare CPU per token; throughput ratios are "
                  "each to their own run's (a)).", "",
                  "| level | variant | before: server CPU us/tok | after: server CPU us/tok | before: ratio to (a) "
                  "| after: ratio to (a) | before: TTFT over vLLM's own ms | after: TTFT over vLLM's own ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in ov_before["table"].items():
            for v in ("tcp", "http"):
                b_, a_ = row.get(v), ov_after["table"].get(key, {}).get(v)
                if b_ and a_:
                    lines.append(f"| {key} | {overhead.LABELS[v]} | {b_.get('server_cpu_us_per_token')} "
                                 f"| {a_.get('server_cpu_us_per_token')} | {b_.get('tok_s_ratio')} "
                                 f"| {a_.get('tok_s_ratio')} | {b_.get('ttft_over_engine_mean_ms')} "
                                 f"| {a_.get('ttft_over_engine_mean_ms')} |")
        lines.append("")
    lc_before, lc_after = _load("lifecycle-before"), results.get("lifecycle")
    if lc_before and lc_after:
        lines += ["### Exit times, before and after", "",
                  f"Before: `{lc_before.get('command')}` with the worker from `{lc_before.get('worker_tree')}` at "
                  f"{lc_before['machine']['date']}.", "",
                  "| metric (ms) | before p50 | before max | after p50 | after max |", "|---|---|---|---|---|"]
        for metric, b_ in lc_before.items():
            a_ = lc_after.get(metric)
            if isinstance(b_, dict) and "p50" in b_ and isinstance(a_, dict) and b_.get("n"):
                lines.append(f"| {metric} | {b_['p50']} | {b_['max']} | {a_['p50']} | {a_['max']} |")
        lines.append("")
    return (["## Before and after this work's fixes", "", *lines] if lines else [])


def render() -> str:
    results: dict[str, dict[str, Any]] = {}
    for name in SUITES:
        path = OUT / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    m = machine()
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m bench` (`scripts/bench`) from bench/out/*.json; each section names the command "
        "that produced it. Full run: `scripts/bench`; a smaller one: `scripts/bench --quick`; one suite: "
        "`scripts/bench overhead|speed|lifecycle [--quick]`.",
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        *_aims(results),
    ]
    for name, result in results.items():
        lines += [f"## {TITLES[name]}", "",
                  f"`{result.get('command', 'scripts/bench ' + name)}` at {result['machine']['date']}", ""]
        lines += MARKDOWN[name](result)
        lines.append("")
    lines += _before_after(results)
    notes = OUT.parent / "FINDINGS.md"
    if notes.exists():
        lines += [notes.read_text()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--render" in argv:  # only rebuild RESULTS.md from bench/out/*.json
        RESULTS_MD.write_text(render())
        return 0
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("-")] or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {list(SUITES)}", file=sys.stderr)
        return 2
    common.COMMAND = " ".join(["python -m bench", *argv])
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        path = OUT / f"{name}.json"
        before = path.stat().st_mtime if path.exists() else None
        result = SUITES[name](quick)
        if path.exists() and path.stat().st_mtime != before:
            continue  # the suite wrote its own (some write variants under other names)
        common.write(name, result)
    text = render()
    RESULTS_MD.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
