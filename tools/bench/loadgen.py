#!/usr/bin/env python3
"""Closed-loop load generator for OpenAI-compatible completion servers (issue #18).

Python 3.11 standard library only (threads + http.client), so it runs anywhere the servers run
and measures `gemma3 serve` and llama.cpp's `llama-server` with the same client.

N clients run concurrently, each sending R streaming requests one after another (closed loop:
a client sends its next request when the previous one has finished). Every request asks for
exactly max_tokens tokens (temperature 0, "ignore_eos": true, which llama-server and gemma3
serve both honour), with "stream_options": {"include_usage": true}, so output tokens are read
from the final chunk's usage (falling back to counting content chunks when there is none).

Per request it measures
  TTFT     time from sending the request to the first chunk carrying non-empty content
           (chat: choices[0].delta.content, completions: choices[0].text);
  latency  time from sending the request to the end of the stream ([DONE] or end of body);
  TPOT     (latency - TTFT) / (output tokens - 1): time per output token after the first.
and reports over the run: requests/s and output tokens/s (successful requests and their tokens
over the wall time from the first send to the last finish), TTFT p50/p99, latency p50/p99,
TPOT p50, and errors. One warm-up request (not counted) goes first.

Prompts: a fixed list of natural-text prompts of varied length (about 50 to 200 tokens). Client
c's request r takes prompt (c * R + r) mod len(PROMPTS), and by default starts with a short
unique tag ("[request c.r]") so that no server can answer a prompt out of a prompt cache filled
by an earlier request (llama-server keeps each slot's last prompt; --no-unique turns the tag off).

usage: tools/bench/loadgen.py [--url http://127.0.0.1:8080] [-c CLIENTS] [-r REQUESTS_PER_CLIENT]
         [-n MAX_TOKENS] [--endpoint chat|completions] [--model NAME] [--api-key KEY]
         [--json FILE|-] [--label TEXT] [--timeout S] [--wait S] [--no-warmup] [--no-unique]
Exit status: 0 when every request succeeded, 1 when some failed, 2 when none succeeded, on
usage errors, and when --wait ran out before GET /health answered 200.
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import threading
import time
import urllib.parse

# Natural text, varied length: the shortest is about 50 tokens, the longest about 200 (Gemma 3
# tokenizer). Fixed so that runs on different days and servers are comparable.
PROMPTS = [
    "Explain in simple terms why the sky appears blue during the day but turns red and orange "
    "at sunset. Mention the role of the atmosphere and the wavelength of light, and keep the "
    "explanation suitable for a curious ten-year-old who likes asking questions.",

    "Write a short story about a lighthouse keeper who discovers that the light has been "
    "guiding something other than ships. The keeper lives alone on a rocky island, keeps a "
    "careful logbook of every vessel that passes, and has never missed a single night in "
    "twenty years. One winter evening the logbook shows an entry in handwriting that is not "
    "the keeper's own.",

    "Summarize the main causes of the French Revolution for a high school history class. Cover "
    "the financial crisis of the monarchy, the tax burden on the Third Estate, the influence of "
    "Enlightenment ideas, the poor harvests and the price of bread, and the political events of "
    "1789. Finish with three questions the students could discuss in small groups afterwards.",

    "I am planning a three-day hiking trip in the mountains in early autumn. The trail climbs "
    "about a thousand metres on the first day, follows a ridge on the second, and descends "
    "through a forest on the third. Nights may drop below freezing and there is no water "
    "source on the ridge. Give me a packing list organised by category, and explain briefly "
    "why each item matters, paying special attention to water, layers of clothing, and what "
    "to do if the weather turns bad while I am on the exposed ridge. I will be carrying "
    "everything myself, so weight matters, and I would like to keep the pack under twelve "
    "kilograms including food and water. Tell me which items I could share with a friend if "
    "one joins me, and which ones each of us should carry anyway.",

    "Describe how a bill becomes a law in a parliamentary democracy, from the first draft to "
    "the final signature. Explain the role of committees, the readings in each chamber, and "
    "what happens when the two chambers disagree. Then compare it briefly with the process in "
    "a presidential system, where the head of government is not a member of the legislature and "
    "may veto the bill.",

    "You are a friendly cooking assistant. A user has chicken thighs, a tin of chopped "
    "tomatoes, an onion, two cloves of garlic, some dried oregano, half a lemon, and a bag of "
    "rice. They have about forty minutes and one large pan. Suggest a recipe, list the steps "
    "in order, and give one tip that makes the dish taste better without extra ingredients.",

    "What are the differences between a comet, an asteroid, and a meteor? Give one famous "
    "example of each, say where in the solar system they are usually found, and explain why "
    "comets grow tails when they come close to the Sun while asteroids do not.",

    "Our small team maintains a web application that has grown over five years from a single "
    "script into a large codebase with few tests. Deployments happen by hand on Friday "
    "afternoons, and roughly one release in four has to be rolled back. New engineers take "
    "weeks to become productive because nothing is documented, and the two people who know "
    "the billing module are about to go on holiday at the same time. Management wants new "
    "features every sprint. Propose a realistic plan for the next three months that improves "
    "reliability without stopping feature work, and explain which problems you would tackle "
    "first and why. Be specific about what you would measure to know that the plan works. "
    "Assume the team has five developers, one part-time tester, a modest cloud budget, and a "
    "product owner who is sympathetic but under pressure from sales. Include a rough timeline "
    "week by week for the first month, name the risks that could derail the plan, and suggest "
    "how to explain the trade-offs to management in a single slide that a busy executive would "
    "read in under a minute.",

    "Translate the following sentence into French, Spanish, and German, and then explain any "
    "differences in word order between the three translations: The old bookshop on the corner "
    "closes early on Sundays, but the owner always leaves a box of free books outside.",

    "Write a polite email to a neighbour asking them to trim the hedge that has grown over the "
    "shared path. Mention that it blocks the way for a pushchair, offer to help with the work "
    "or with disposing of the cuttings, and keep the tone warm rather than demanding.",

    "Explain what photosynthesis is, which parts of the plant are involved, and why it matters "
    "for life on Earth as a whole. Describe what happens in the light-dependent reactions and in "
    "the Calvin cycle, say where oxygen comes from, and give two reasons why a plant kept in a "
    "dark cupboard for a week turns pale and weak even when it is watered.",

    "A museum wants to attract more teenagers. It has a large collection of fossils, a room of "
    "old scientific instruments, a small planetarium, and a cafe that is usually empty in the "
    "afternoons. Its budget is modest and the staff are mostly volunteers over sixty who know "
    "the collection extremely well but are unfamiliar with social media. Suggest five concrete "
    "ideas the museum could try within a year, estimate roughly what each would cost, and say "
    "how the museum could tell whether each idea worked.",

    "Give me a step-by-step explanation of how to solve a quadratic equation by completing the "
    "square, using the example x squared plus six x plus five equals zero, and then check the "
    "answer by substituting the solutions back into the equation.",

    "Compose a short poem about a city waking up in the rain: the first bus, the bakery lights, "
    "wet pavements, people with umbrellas, and a cat watching everything from a windowsill. Use "
    "four stanzas of four lines, a gentle rhythm, and end with an image of the sun breaking "
    "through the clouds over the river.",

    "Compare renting and buying a home for a young couple who expect to move cities within the "
    "next five years for work. Consider upfront costs, monthly costs, flexibility, risk, and "
    "the effort of selling a property, and finish with a clear recommendation and the one "
    "question they should answer before deciding.",

    "Describe the water cycle, including evaporation, condensation, precipitation, and "
    "collection, and give an everyday example of each stage. Then explain how cutting down a "
    "large forest can change the rainfall of the region around it, and why cities with many "
    "paved surfaces are more likely to flood after a heavy storm than the countryside.",
]


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default); nan for an empty list."""
    if not values:
        return math.nan
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Target:
    def __init__(self, url: str, endpoint: str, model: str, api_key: str | None, timeout: float):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https"):
            raise SystemExit(f"unsupported URL scheme {u.scheme!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname or "127.0.0.1", u.port
        self.base = u.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.endpoint, self.model, self.api_key, self.timeout = endpoint, model, api_key, timeout
        self.path = self.base + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = "Bearer " + self.api_key
        return h

    def body(self, prompt: str, max_tokens: int) -> bytes:
        req = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            req["messages"] = [{"role": "user", "content": prompt}]
        else:
            req["prompt"] = prompt
        return json.dumps(req).encode()


def chunk_text(obj: dict, endpoint: str) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if endpoint == "chat":
        return (c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


def one_request(target: Target, conn_box: list, prompt: str, max_tokens: int) -> dict:
    """Sends one streaming request on the client's kept-alive connection (reconnecting once if the
    server closed it) and returns the measurement."""
    body = target.body(prompt, max_tokens)
    res = {"ok": False, "ttft": None, "latency": None, "tokens": 0, "chunks": 0, "usage": False,
           "error": None}
    for attempt in (0, 1):
        if conn_box[0] is None:
            conn_box[0] = target.connect()
        conn = conn_box[0]
        t0 = time.perf_counter()
        try:
            conn.request("POST", target.path, body=body, headers=target.headers())
            resp = conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest,
                BrokenPipeError) as e:
            conn.close()
            conn_box[0] = None
            if attempt == 0:
                continue  # a kept-alive connection the server had closed: one fresh try
            res["error"] = f"connect: {e!r}"
            return res
        except OSError as e:
            conn.close()
            conn_box[0] = None
            res["error"] = f"connect: {e!r}"
            return res
        break
    try:
        if resp.status != 200:
            text = resp.read(2000).decode("utf-8", "replace")
            res["error"] = f"HTTP {resp.status}: {text.strip()[:300]}"
            resp.close()
            conn.close()
            conn_box[0] = None
            return res
        usage_tokens = None
        done = False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ": comments", "event:" lines
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                res["error"] = f"bad chunk: {data[:200]!r}"
                break
            if "error" in obj:
                res["error"] = f"stream error: {json.dumps(obj['error'])[:300]}"
                break
            if chunk_text(obj, target.endpoint):
                res["chunks"] += 1
                if res["ttft"] is None:
                    res["ttft"] = time.perf_counter() - t0
            u = obj.get("usage")
            if u and u.get("completion_tokens") is not None:
                usage_tokens = int(u["completion_tokens"])
        res["latency"] = time.perf_counter() - t0
        if done:
            # drain what follows [DONE] so the connection can be reused
            while resp.readline():
                pass
        resp.close()
        if resp.will_close:
            conn.close()
            conn_box[0] = None
        if res["error"] is None:
            res["usage"] = usage_tokens is not None
            res["tokens"] = usage_tokens if usage_tokens is not None else res["chunks"]
            if res["ttft"] is None:
                res["error"] = "no content in the stream"
            else:
                res["ok"] = True
    except (OSError, http.client.HTTPException) as e:
        res["error"] = f"stream: {e!r}"
        res["latency"] = time.perf_counter() - t0
        conn.close()
        conn_box[0] = None
    return res


def run(target: Target, clients: int, per_client: int, max_tokens: int, unique: bool,
        warmup: bool) -> dict:
    if warmup:
        box = [None]
        w = one_request(target, box, "[warm-up] " + PROMPTS[0], max_tokens)
        if box[0] is not None:
            box[0].close()
        if not w["ok"]:
            print(f"warm-up request failed: {w['error']}", file=sys.stderr)
    results: list[list[dict]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        box = [None]
        start.wait()
        for r in range(per_client):
            p = PROMPTS[(c * per_client + r) % len(PROMPTS)]
            if unique:
                p = f"[request {c}.{r}] " + p
            results[c].append(one_request(target, box, p, max_tokens))
        if box[0] is not None:
            box[0].close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r["ok"]]
    errors = [r["error"] for r in flat if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    lat = [r["latency"] for r in ok]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {
        "clients": clients,
        "requests_per_client": per_client,
        "max_tokens": max_tokens,
        "requests": len(flat),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "short": sum(1 for r in ok if r["tokens"] != max_tokens),  # outputs != max_tokens
        "usage_reported": sum(1 for r in ok if r["usage"]),
        "wall_s": wall,
        "output_tokens": tokens,
        "req_per_s": len(ok) / wall if wall > 0 else math.nan,
        "out_tok_per_s": tokens / wall if wall > 0 else math.nan,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "ttft_mean_ms": (sum(ttft) / len(ttft) * 1e3) if ttft else math.nan,
        "latency_p50_ms": percentile(lat, 50) * 1e3,
        "latency_p99_ms": percentile(lat, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
    }


def wait_ready(target: Target, timeout: float) -> bool:
    """Polls GET /health until it answers 200 (both servers answer 503 while loading)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            conn = target.connect()
            conn.request("GET", target.base + "/health")
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def first_model(target: Target) -> str | None:
    try:
        conn = target.connect()
        conn.request("GET", target.base + "/v1/models", headers=target.headers())
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if resp.status == 200:
            return json.loads(data)["data"][0]["id"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
        pass
    return None


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Closed-loop load generator for OpenAI-compatible servers (streaming).")
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    ap.add_argument("-c", "--clients", type=int, default=1, help="concurrent clients")
    ap.add_argument("-r", "--requests", type=int, default=4, help="requests per client")
    ap.add_argument("-n", "--max-tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                    help="/v1/chat/completions (default) or /v1/completions")
    ap.add_argument("--model", default=None,
                    help="the request's model field (default: the first id GET /v1/models lists)")
    ap.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--json", metavar="FILE", help="append the summary as one JSON line to FILE ('-': stdout)")
    ap.add_argument("--label", default="", help="copied into the JSON (e.g. the engine)")
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout, seconds")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="first wait up to this many seconds for GET /health to answer 200")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    ap.add_argument("--no-unique", action="store_true",
                    help="send the prompts without the unique per-request tag")
    a = ap.parse_args()
    if a.clients < 1 or a.requests < 1 or a.max_tokens < 1:
        ap.error("--clients, --requests and --max-tokens must be at least 1")

    target = Target(a.url, a.endpoint, a.model, a.api_key, a.timeout)
    if a.wait > 0 and not wait_ready(target, a.wait):
        print(f"{a.url}: /health did not answer 200 within {a.wait:g} s", file=sys.stderr)
        return 2
    if target.model is None:
        target.model = first_model(target) or "default"
    try:
        s = run(target, a.clients, a.requests, a.max_tokens, not a.no_unique, not a.no_warmup)
    except KeyboardInterrupt:
        return 130
    s.update({"label": a.label, "url": a.url, "endpoint": a.endpoint, "model": target.model})

    tag = f"[{a.label}] " if a.label else ""
    print(f"{tag}{a.endpoint} x{s['clients']} clients x{s['requests_per_client']} requests, "
          f"max_tokens {s['max_tokens']}: {s['ok']}/{s['requests']} ok in {s['wall_s']:.2f} s\n"
          f"  requests/s {s['req_per_s']:.3f}   output tok/s {s['out_tok_per_s']:.1f}\n"
          f"  TTFT p50 {s['ttft_p50_ms']:.1f} ms  p99 {s['ttft_p99_ms']:.1f} ms   "
          f"latency p50 {s['latency_p50_ms']:.0f} ms  p99 {s['latency_p99_ms']:.0f} ms   "
          f"TPOT p50 {s['tpot_p50_ms']:.2f} ms", file=sys.stderr)
    if s["errors"]:
        print(f"  {s['errors']} errors, e.g. {s['error_samples']}", file=sys.stderr)
    if s["short"]:
        print(f"  {s['short']} requests returned other than {a.max_tokens} tokens "
              "(ignore_eos not honoured?)", file=sys.stderr)
    if s["ok"] and s["usage_reported"] < s["ok"]:
        print(f"  {s['ok'] - s['usage_reported']} responses had no usage; tokens counted as "
              "content chunks", file=sys.stderr)
    if a.json:
        text = json.dumps(s)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "a") as f:
                f.write(text + "\n")
    return 0 if s["errors"] == 0 else 1 if s["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
