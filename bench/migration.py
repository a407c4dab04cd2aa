"""Migration under chaos: a frontend over synthetic workers (real processes), 32 clients
streaming back to back, and a worker SIGKILLed every 5 s (and a fresh one started in its
place) for 60 s. Every stream's text is checked against what the synthetic engine answers
uninterrupted (its next token is a function of the whole history, so a migrated stream's
continuation is known exactly).

    python -m bench migration [--quick]
"""

from __future__ import annotations

import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from tests.procs import Worker
from tests.synthetic import text

from .common import write

STREAMS = 32
MAX_TOKENS = 200  # 2 s at 10 ms a token
WORKERS = 4
KILL_EVERY_S = 5.0


def _value(page: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(page) for s in f.samples if s.name == name)


def run(quick: bool = False) -> dict[str, Any]:
    duration = 20.0 if quick else 60.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    env: dict[str, str | None] = {"DYN_FILE_DISCOVERY_DIR": str(tmp)}
    workers: list[Worker] = []
    everyone: list[Worker] = []

    def start_worker() -> Worker:
        w = Worker("--engine", "synthetic", "--synthetic-step-ms", "10", "--system-port", "0", env=env)
        everyone.append(w)
        w.wait_event("endpoint.registered", timeout=60)
        return w

    outcomes: dict[str, int] = {"intact": 0, "wrong": 0, "error": 0}
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    try:
        workers = [start_worker() for _ in range(WORKERS)]
        frontend = Worker("--role", "frontend", "--engine", "synthetic", "--http-port", "0", "--system-port", "0",
                          env=env)
        everyone.append(frontend)
        frontend.wait_ready(60)
        port = frontend.wait_event("http.listening")["port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)

        def loop(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                prompt = f"stream {i} turn {n}"
                try:
                    got = "".join(c.choices[0].text for c in client.completions.create(
                        model="synthetic", prompt=prompt, max_tokens=MAX_TOKENS, stream=True) if c.choices)
                    kind = "intact" if got == text(prompt.encode(), MAX_TOKENS) else "wrong"
                except openai.APIError as exc:
                    kind = "error"
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                with lock:
                    outcomes[kind] += 1

        clients = [threading.Thread(target=loop, args=(i,)) for i in range(STREAMS)]
        for t in clients:
            t.start()
        rng = random.Random(0)
        kills = 0
        started = time.monotonic()
        while time.monotonic() - started < duration:
            time.sleep(KILL_EVERY_S)
            victim = rng.choice(workers)
            victim.proc.send_signal(signal.SIGKILL)
            workers.remove(victim)
            workers.append(start_worker())
            kills += 1
            print(f"  {time.monotonic() - started:5.1f}s: killed a worker ({kills}); so far {outcomes}",
                  file=sys.stderr, flush=True)
        stop.set()
        for t in clients:
            t.join(60)
        migrations = _value(frontend.get("/metrics").text, "dynamo_frontend_migrations_total")
    finally:
        stop.set()
        for w in everyone:
            w.stop()
    total = sum(outcomes.values())
    return {"duration_s": duration, "streams": STREAMS, "workers": WORKERS, "kill_every_s": KILL_EVERY_S,
            "kills": kills, "requests": total, "outcomes": outcomes, "migrations": migrations,
            "intact_share": round(outcomes["intact"] / total, 4) if total else 0.0, "errors": errors[:10]}


def markdown(result: dict[str, Any]) -> list[str]:
    o = result["outcomes"]
    return [f"A frontend over {result['workers']} synthetic workers, {result['streams']} clients streaming "
            f"{MAX_TOKENS}-token completions back to back for {result['duration_s']:.0f} s, a worker SIGKILLed every "
            f"{result['kill_every_s']:.0f} s ({result['kills']} kills, each replaced by a fresh worker).", "",
            "| requests | intact (exactly the uninterrupted text) | wrong text | error | migrations |",
            "|---|---|---|---|---|",
            f"| {result['requests']} | {o['intact']} ({result['intact_share']:.1%}) | {o['wrong']} | {o['error']} "
            f"| {result['migrations']:.0f} |"]


if __name__ == "__main__":
    out = run("--quick" in sys.argv)
    write("migration", out)
    print("\n".join(markdown(out)))
