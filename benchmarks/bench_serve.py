"""Load benchmark of ``recyclegpt serve``: N concurrent streaming chat clients over loopback.

Each ``--server NAME=ARGS`` starts its own server subprocess (``python -m recyclegpt.cli serve --model M
--module D --host 127.0.0.1 --port P ARGS``), waits for ``GET /health``, runs one short warm-up request
(not measured), benchmarks it and stops it (also on Ctrl-C or an error). The servers run one after another,
in one invocation, on the same prompts.

For each strategy (sent per request as the body field ``strategy``, with ``draft_len`` / ``draft_width`` where
given, else the server's defaults):

1. Alone pass: every distinct prompt, one request at a time; these greedy texts are the references.
2. For each client count N: N clients (``openai.AsyncOpenAI``, one each) start together; each sends
   ``--requests-per-client`` streaming chat completions one after another (``temperature=0``,
   ``stream_options={"include_usage": True}``).

Prompts: ``benchmarks/prompts.jsonl`` and ``benchmarks/heldout_self_prompts.jsonl`` (17 to 148 characters),
sorted by length; request r of client c (pair k = c * requests + r) takes, by turns, the next shortest
(k even) and the next longest (k odd) prompt, so a client count always gets the same requests.

Measured per request: time to first token (TTFT: from sending to the first chunk with text), per-token
latency ((end - first token) / (completion tokens - 1), tokens from ``usage``), and the text. Per (server,
strategy, N): throughput = all completion tokens / wall time of the whole N-client run, p50 / p95 of TTFT
and of per-token latency, and how many texts equal their prompt's reference (mismatches listed in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import openai
import torch
from tqdm import tqdm

from recyclegpt.hardware import cpu_info

ROOT = Path(__file__).resolve().parent.parent
PROMPT_FILES = (ROOT / "benchmarks" / "prompts.jsonl", ROOT / "benchmarks" / "heldout_self_prompts.jsonl")


class ServerError(Exception):
    """A server subprocess exited or did not come up."""


def load_prompts(paths: list[Path]) -> list[str]:
    """The ``prompt`` fields of JSONL files, without duplicates, shortest first (ties in file order)."""
    prompts = [json.loads(line)["prompt"] for p in paths for line in p.read_text().splitlines() if line.strip()]
    return sorted(dict.fromkeys(prompts), key=len)


def assign_prompts(prompts: list[str], clients: int, requests: int) -> list[list[str]]:
    """The prompts of each client: pair k = c * requests + r alternates the short and the long end."""
    half = max(1, len(prompts) // 2)
    pick = [prompts[(k // 2) % half] if k % 2 == 0 else prompts[-1 - (k // 2) % half]
            for k in range(clients * requests)]
    return [pick[c * requests:(c + 1) * requests] for c in range(clients)]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(extra: list[str], model: str, module: str, timeout_s: float) -> Iterator[tuple[str, str]]:
    """Run a server subprocess until the block ends; yields (base URL of the API, served model name).

    Raises:
        ServerError: the server exited or did not answer ``/health`` within ``timeout_s`` (its log is shown).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "recyclegpt.cli", "serve", "--model", model, "--module", module,
           "--host", "127.0.0.1", "--port", str(port), *extra]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, up = time.monotonic() + timeout_s, False
            while not up and proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    up = httpx.get(f"{url}/health", timeout=2).status_code == 200
                time.sleep(0 if up else 0.5)
            if not up:
                log.seek(0)
                state = f"exited with code {proc.returncode}" if proc.poll() is not None else "did not start in time"
                raise ServerError(f"server {shlex.join(cmd)} {state}; its log ends:\n{log.read()[-3000:]}")
            yield f"{url}/v1", httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def one_request(api: openai.AsyncOpenAI, model: str, prompt: str, body: dict, max_tokens: int) -> dict:
    """One streaming greedy chat completion: its text, completion tokens, TTFT (s) and per-token latency (ms).

    A reply without text (EOS first) counts its end as its first token; per-token latency is None below 2 tokens.
    """
    t0 = time.perf_counter()
    first, parts, tokens = None, [], 0
    stream = await api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], stream=True, temperature=0,
        max_tokens=max_tokens, stream_options={"include_usage": True}, extra_body=body)
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
    end = time.perf_counter()
    first = first or end
    return {"prompt": prompt, "text": "".join(parts), "tokens": tokens, "ttft_s": first - t0,
            "per_token_ms": 1000 * (end - first) / (tokens - 1) if tokens > 1 else None}


async def run_clients(url: str, model: str, plan: list[list[str]], body: dict, max_tokens: int,
                      bar: tqdm) -> tuple[list[dict], float]:
    """Run one client per entry of ``plan`` at once, each sending its prompts in turn; (requests, wall s)."""
    apis = [openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=3600) for _ in plan]

    async def client(c: int, prompts: list[str]) -> list[dict]:
        done = []
        for r, prompt in enumerate(prompts):
            done.append({"client": c, "request": r, **await one_request(apis[c], model, prompt, body, max_tokens)})
            bar.update()
        return done

    try:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(c, ps) for c, ps in enumerate(plan)))
        wall = time.perf_counter() - t0
    finally:
        for api in apis:
            await api.close()
    return [r for rs in per_client for r in rs], wall


def summarize(requests: list[dict], wall_s: float, refs: dict[str, str]) -> dict:
    """A row's figures: throughput, p50 / p95 TTFT and per-token latency, texts equal to their reference."""
    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    ttft = [r["ttft_s"] for r in requests]
    per_token = [r["per_token_ms"] for r in requests if r["per_token_ms"] is not None]
    tokens = sum(r["tokens"] for r in requests)
    mismatches = [{k: r[k] for k in ("client", "request", "prompt", "text")} | {"alone": refs[r["prompt"]]}
                  for r in requests if r["text"] != refs[r["prompt"]]]
    return {
        "requests": len(requests), "completion_tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
        "per_token_p50_ms": pct(per_token, 50), "per_token_p95_ms": pct(per_token, 95),
        "equal_to_alone": len(requests) - len(mismatches), "mismatches": mismatches,
        "samples": [{k: r[k] for k in ("client", "request", "tokens", "ttft_s", "per_token_ms")} for r in requests],
    }


async def bench_server(url: str, model: str, args: argparse.Namespace, plans: dict[int, list[list[str]]],
                       distinct: list[str], bar: tqdm) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Warm up, then per strategy the alone pass over the ``distinct`` prompts and one row per client count;
    returns (rows, strategy -> prompt -> text served alone)."""
    await run_clients(url, model, [distinct[:1]], {"strategy": "standard"}, 4, bar)
    rows, alone = [], {}
    for strategy in args.strategy:
        body = {"strategy": strategy} | {k: v for k, v in (("draft_len", args.draft_len),
                                                           ("draft_width", args.draft_width)) if v is not None}
        bar.set_postfix_str(f"{strategy} alone")
        done, _ = await run_clients(url, model, [distinct], body, args.max_tokens, bar)
        alone[strategy] = {r["prompt"]: r["text"] for r in done}
        for n, plan in plans.items():
            bar.set_postfix_str(f"{strategy} N={n}")
            done, wall = await run_clients(url, model, plan, body, args.max_tokens, bar)
            rows.append({"strategy": strategy, "clients": n, **summarize(done, wall, alone[strategy])})
    return rows, alone


def format_table(rows: list[dict]) -> str:
    """The markdown table of all rows; ``x first`` is throughput over the first server's (same strategy, N)."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| server | strategy | clients | tok/s | x first | TTFT p50 s | TTFT p95 s | ms/token p50 "
             "| ms/token p95 | = alone |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['server']} | {r['strategy']} | {r['clients']} | {r['tokens_per_s']:.1f} "
                     f"| {r['ratio_to_first']:.2f} | {num(r['ttft_p50_s'], '.2f')} | {num(r['ttft_p95_s'], '.2f')} "
                     f"| {num(r['per_token_p50_ms'], '.1f')} | {num(r['per_token_p95_ms'], '.1f')} "
                     f"| {r['equal_to_alone']}/{r['requests']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Throughput and p95 TTFT against client count, one line per (server, strategy)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in dict.fromkeys((r["server"], r["strategy"]) for r in rows):
        mine = [r for r in rows if (r["server"], r["strategy"]) == key]
        xs = [r["clients"] for r in mine]
        left.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", label=" / ".join(key))
        right.plot(xs, [r["ttft_p95_s"] for r in mine], marker="o", label=" / ".join(key))
    ns = sorted({r["clients"] for r in rows})
    for ax, ylabel in ((left, "throughput, tokens/s (all clients)"), (right, "p95 time to first token, s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> dict:
    """The checked-out commit and whether the working tree had changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def parse_server(spec: str) -> tuple[str, list[str]]:
    """``NAME=ARGS`` -> (NAME, shell-split ARGS)."""
    name, sep, extra = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS (e.g. serial=\"--max-batch 1\"), got {spec!r}")
    return name, shlex.split(extra)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, benchmark every server, print the table, write the JSON and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", type=parse_server, action="append", metavar="NAME=ARGS",
                   help="a server to benchmark: a label and extra `recyclegpt serve` arguments (repeatable; the "
                   "first is the reference of the ratios; default: serial=\"\")")
    p.add_argument("--strategy", action="append", help="decoding strategy sent per request (repeatable; "
                   "default: standard and verified)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="client counts (default 1 4 8 16)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--draft-len", type=int, default=None, help="draft_len sent per request (default: the server's)")
    p.add_argument("--draft-width", type=int, default=None,
                   help="draft_width sent per request (default: the server's)")
    p.add_argument("--model", default="smollm2-135m", help="the server's --model (default smollm2-135m)")
    p.add_argument("--module", default="default", help="the server's --module (default: default)")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health (default 600)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve.json",
                   help="result file (default benchmarks/results/bench_serve.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the JSON path with .png)")
    args = p.parse_args(argv)
    args.server = args.server or [("serial", [])]
    args.strategy = args.strategy or ["standard", "verified"]
    if len(dict(args.server)) != len(args.server):
        p.error("server names must differ")
    if min(args.clients + [args.requests_per_client, args.max_tokens]) < 1:
        p.error("--clients, --requests-per-client and --max-tokens must be >= 1")
    prompts = load_prompts(list(PROMPT_FILES))
    plans = {n: assign_prompts(prompts, n, args.requests_per_client) for n in args.clients}
    distinct = list(dict.fromkeys(p for plan in plans.values() for ps in plan for p in ps))
    per_strategy = len(distinct) + sum(args.clients) * args.requests_per_client
    rows: list[dict] = []
    alone: dict[str, dict] = {}  # server -> strategy -> prompt -> text served alone
    agree: dict[str, dict] = {}  # server -> strategy -> prompts whose alone text equals the first server's
    with tqdm(total=len(args.server) * (1 + len(args.strategy) * per_strategy), unit="req") as bar:
        for name, extra in args.server:
            bar.set_description(name)
            with serving(extra, args.model, args.module, args.startup_timeout) as (url, model):
                mine, texts = asyncio.run(bench_server(url, model, args, plans, distinct, bar))
            rows += [{"server": name, **r} for r in mine]
            reference = next(iter(alone.values()), texts)  # the first server's references (strategy -> texts)
            alone[name] = texts
            agree[name] = {s: sum(t == reference[s][p] for p, t in texts[s].items()) for s in texts}
    first = {(r["strategy"], r["clients"]): r["tokens_per_s"] for r in rows if r["server"] == args.server[0][0]}
    for r in rows:
        r["ratio_to_first"] = r["tokens_per_s"] / first[(r["strategy"], r["clients"])]
    cpu = cpu_info()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    result = {"command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), "date": when,
              **git_commit(), "cpu": cpu.record(), "torch": torch.__version__, "model": args.model,
              "module": args.module, "servers": {n: shlex.join(e) for n, e in args.server},
              "strategies": args.strategy, "clients": args.clients, "requests_per_client": args.requests_per_client,
              "max_tokens": args.max_tokens, "draft_len": args.draft_len, "draft_width": args.draft_width,
              "prompt_files": [str(f.relative_to(ROOT)) for f in PROMPT_FILES], "rows": rows,
              "alone_equal_to_first_server": agree, "alone": alone}
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot_path = args.plot or args.json.with_suffix(".png")
    plot(rows, plot_path, f"recyclegpt serve, {args.model}; {cpu.model}, {cpu.cores} cores; {when[:10]}, "
         f"commit {result['commit'][:7]}")
    print(f"wrote {args.json} and {plot_path}")


if __name__ == "__main__":
    try:
        main()
    except ServerError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the server is already stopped
        sys.exit(130)
