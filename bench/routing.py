"""Routing quality at scale, by simulation: the frontend's own router (actors.frontend.router,
with its KV index fed the KV events the workers would publish) deciding for 16-64 simulated
workers under a prefix-heavy workload, kv against round-robin.

Each simulated worker has a prefix cache (LRU of KV blocks, as the synthetic engine and vLLM
keep one) and prefills one request at a time: a request's time to first token is the time it
waits for the worker's earlier prefills plus its own, ``PREFILL_S_PER_TOKEN`` per prompt token
not found in the cache. Decode is not simulated beyond the KV blocks a request holds while it
runs (the router's active-block count). The workload: shared system prompts and multi-turn
sessions (each turn's prompt is the session so far plus a new question), arriving as a Poisson
process at about 70% of the cluster's round-robin prefill capacity.

The router's own cost is measured for real (wall clock per ``pick``) as its index grows.

    python -m bench routing [--quick]
"""

from __future__ import annotations

import heapq
import random
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from actors.frontend.instances import Instance
from actors.frontend.kv_index import KvIndex, local_hashes
from actors.frontend.router import Router, RouterConfig
from supervisor.planes.discovery import InstanceRecord

from .common import summary, write

BLOCK = 16
PREFILL_S_PER_TOKEN = 0.0002  # 0.2 ms a token (a 1,000-token prompt: 200 ms)
DECODE_S = 1.5  # how long a request holds its blocks after its first token
CACHE_BLOCKS = 2048  # per worker
SYSTEM_PROMPTS = 48
SYSTEM_TOKENS = 1024
TURN_TOKENS = 96  # a question plus the answer carried into the next turn


@dataclass
class SimWorker:
    instance: Instance
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    busy_until: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    event_id: int = 0

    def prefill(self, hashes: list[int], tokens: list[int], now: float) -> tuple[float, int]:
        """Run the prefill after whatever is queued; (time of first token, cached blocks)."""
        hit = 0
        for h in hashes:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            hit += 1
        new = hashes[hit:]
        if new:
            parent = hashes[hit - 1] if hit else None
            self.events.append({"type": "stored", "block_hashes": new, "parent_hash": parent,
                                "token_ids": tokens[hit * BLOCK:len(hashes) * BLOCK], "block_size": BLOCK})
        for h in new:
            self.cache[h] = None
        evicted = []
        while len(self.cache) > CACHE_BLOCKS:
            evicted.append(self.cache.popitem(last=False)[0])
        if evicted:
            self.events.append({"type": "removed", "block_hashes": evicted})
        start = max(now, self.busy_until)
        self.busy_until = start + (len(tokens) - hit * BLOCK) * PREFILL_S_PER_TOKEN
        return self.busy_until, hit


def _vllm_hashes(tokens: list[int]) -> list[int]:
    """Stand-ins for vLLM's block hashes: a chain over the blocks, as vLLM's is."""
    out, parent = [], 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        parent = hash(("vllm", parent, tuple(tokens[start:start + BLOCK]))) & (2**63 - 1)
        out.append(parent)
    return out


def workload(n_requests: int, rng: random.Random) -> list[list[int]]:
    systems = [[rng.randrange(1, 30000) for _ in range(SYSTEM_TOKENS)] for _ in range(SYSTEM_PROMPTS)]
    sessions: list[list[int]] = []
    prompts = []
    for _ in range(n_requests):
        if not sessions or rng.random() < 0.3:  # a new session on a shared system prompt
            sessions.append(list(rng.choice(systems)))
            if len(sessions) > 200:
                sessions.pop(0)
        session = rng.choice(sessions[-50:])
        session.extend(rng.randrange(1, 30000) for _ in range(TURN_TOKENS))
        prompts.append(list(session))
    return prompts


def simulate(mode: str, n_workers: int, prompts: list[list[int]], rate: float, seed: int) -> dict[str, Any]:
    index = KvIndex()
    router = Router(RouterConfig(mode=mode), index, seed=seed)
    workers = [SimWorker(Instance(InstanceRecord("sim", "backend", "generate", f"w{i}", "tcp", "-", "m",
                                                 {"total_kv_blocks": CACHE_BLOCKS, "block_size": BLOCK})))
               for i in range(n_workers)]
    by_id = {w.instance.id: w for w in workers}
    rng = random.Random(seed)
    events: list[tuple[float, int, str, Any]] = []  # (when, order, "first" | "end", decision)
    ttft: list[float] = []
    hits = blocks = 0
    now = 0.0
    for k, tokens in enumerate(prompts):
        now += rng.expovariate(rate)
        while events and events[0][0] <= now:
            _, _, kind, done = heapq.heappop(events)
            if kind == "first":
                router.first_token(done)
            else:
                router.release(done)
        decision = router.pick("m", [w.instance for w in workers], tokens)
        worker = by_id[decision.instance.id]
        hashes = _vllm_hashes(tokens)
        first_token_at, hit = worker.prefill(hashes, tokens, now)
        if mode == "kv" and worker.events:  # the worker's KV events reach the router's index
            worker.event_id += 1
            index.apply((worker.instance.id, 0), worker.event_id, worker.events)
            worker.events = []
        ttft.append(first_token_at - now)
        hits += hit
        blocks += len(local_hashes(tokens, BLOCK))
        heapq.heappush(events, (first_token_at, 2 * k, "first", decision))
        heapq.heappush(events, (first_token_at + DECODE_S, 2 * k + 1, "end", decision))
    overhead = router.stats.overhead_s
    return {"mode": mode, "workers": n_workers, "requests": len(prompts), "ttft_ms": summary(ttft, 1000),
            "kv_hit_rate": round(hits / blocks, 3) if blocks else 0.0,
            "router_us": summary(overhead, 1e6, 1), "index_blocks": index.size()}


def run(quick: bool = False) -> dict[str, Any]:
    sizes = (16,) if quick else (16, 32, 64)
    results = []
    for n in sizes:
        rng = random.Random(n)
        requests = 20 * n if quick else 60 * n
        prompts = workload(requests, rng)
        mean_prefill = sum(len(p) for p in prompts) / len(prompts) * PREFILL_S_PER_TOKEN
        rate = 0.7 * n / mean_prefill
        for mode in ("round-robin", "kv"):
            started = time.monotonic()
            res = simulate(mode, n, prompts, rate, seed=n)
            res["sim_s"] = round(time.monotonic() - started, 1)
            results.append(res)
            print(f"  {mode:>11} {n:>2} workers: TTFT p50 {res['ttft_ms']['p50']} ms, p99 {res['ttft_ms']['p99']} ms,"
                  f" hit {res['kv_hit_rate']:.0%}, router p99 {res['router_us']['p99']} us", file=sys.stderr,
                  flush=True)
    table = {}
    for n in sizes:
        rr = next(r for r in results if r["workers"] == n and r["mode"] == "round-robin")
        kv = next(r for r in results if r["workers"] == n and r["mode"] == "kv")
        table[str(n)] = {"ttft_p50_cut": round(1 - kv["ttft_ms"]["p50"] / rr["ttft_ms"]["p50"], 3),
                         "ttft_p99_cut": round(1 - kv["ttft_ms"]["p99"] / rr["ttft_ms"]["p99"], 3),
                         "router_p99_us": kv["router_us"]["p99"]}
    return {"results": results, "table": table,
            "workload": {"block": BLOCK, "prefill_s_per_token": PREFILL_S_PER_TOKEN, "system_prompts": SYSTEM_PROMPTS,
                         "system_tokens": SYSTEM_TOKENS, "turn_tokens": TURN_TOKENS, "cache_blocks": CACHE_BLOCKS,
                         "load": "0.7 x round-robin prefill capacity"}}


def markdown(result: dict[str, Any]) -> list[str]:
    w = result["workload"]
    lines = [f"Simulated workers (prefix cache of {w['cache_blocks']} blocks of {w['block']} tokens, prefill "
             f"{w['prefill_s_per_token'] * 1e3:g} ms per uncached token), {w['system_prompts']} shared system prompts "
             f"of {w['system_tokens']} tokens and multi-turn sessions (+{w['turn_tokens']} tokens a turn), Poisson "
             f"arrivals at {w['load']}. The router is the frontend's own; its time per decision is measured for real.",
             "", "| workers | mode | TTFT p50 ms | TTFT p99 ms | KV hit rate | router p50 us | router p99 us "
             "| index blocks |", "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['workers']} | {r['mode']} | {r['ttft_ms']['p50']} | {r['ttft_ms']['p99']} "
                     f"| {r['kv_hit_rate']:.0%} | {r['router_us']['p50']} | {r['router_us']['p99']} "
                     f"| {r['index_blocks']} |")
    lines += ["", "| workers | kv cuts TTFT p50 by | kv cuts TTFT p99 by | kv router p99 |", "|---|---|---|---|"]
    for n, t in result["table"].items():
        lines.append(f"| {n} | {t['ttft_p50_cut']:.0%} | {t['ttft_p99_cut']:.0%} | {t['router_p99_us']} us |")
    return lines


if __name__ == "__main__":
    out = run("--quick" in sys.argv)
    write("routing", out)
    print("\n".join(markdown(out)))
