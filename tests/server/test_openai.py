"""gemma3 serve driven by OpenAI's own Python client (issue #18), run by scripts/test-server.sh.

Starts the real binary on the 270M GGUF (and on the tiny vision model for images) and checks
what users of the openai package see: chat and completions, streamed and not, usage, stop
strings, seeds, logprobs, images as data: URIs, every error status, 32 concurrent streaming
clients x 3 requests equal to sequential runs, a client that hangs up mid-stream, the raw SSE
framing (curl), and SIGTERM draining.

usage: python tests/server/test_openai.py --gemma3 BIN --model MODEL.gguf --vision DIR [-v]
"""

import argparse
import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import unittest
import urllib.request

import openai

ARGS = None
KEY = "test-key"


class Server:
    """One `gemma3 serve` process on a free port."""

    def __init__(self, model, *extra):
        cmd = [ARGS.gemma3, "serve", "-m", model, "--port", "0", "-t", "2", *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.cmd = cmd
        self.log = []
        self.port = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on http://[^:]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                if "ready:" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.port is None or self.proc.poll() is not None:
            raise RuntimeError("gemma3 serve did not start:\n" + "".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=300, **kw)

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data

    def metric(self, name):
        _, _, text = self.raw("GET", "/metrics")
        m = re.search(r"^" + re.escape(name) + r" (\S+)$", text.decode(), re.M)
        return float(m.group(1)) if m else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def setUpModule():
    global TEXT, MODEL_ID
    # --batch-invariant: a request's greedy tokens do not depend on what else is in the step.
    TEXT = Server(ARGS.model, "-np", "8", "--ctx", "1024", "--api-key", KEY, "--batch-invariant",
                  "--max-body-bytes", "1048576")
    MODEL_ID = TEXT.client().models.list().data[0].id


def tearDownModule():
    TEXT.stop()


def greedy(client, prompt, n, **kw):
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r


class Api(unittest.TestCase):
    def test_models_and_health(self):
        models = TEXT.client().models.list()
        self.assertEqual(len(models.data), 1)
        self.assertEqual(models.data[0].id, os.path.basename(ARGS.model))
        status, _, body = TEXT.raw("GET", "/health")  # public: no key
        self.assertEqual(status, 200, body)

    def test_chat_and_its_stream_agree(self):
        c = TEXT.client()
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
        full = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, temperature=0)
        choice = full.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertGreater(full.usage.prompt_tokens, 10)
        self.assertEqual(full.usage.total_tokens, full.usage.prompt_tokens + full.usage.completion_tokens)
        self.assertLessEqual(full.usage.completion_tokens, 16)
        text, finish, usage, roles = "", None, None, 0
        for chunk in c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=16, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                usage = chunk.usage
                self.assertEqual(chunk.choices, [])
                continue
            delta = chunk.choices[0].delta
            roles += delta.role == "assistant"
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        self.assertEqual(roles, 1)
        self.assertEqual(text, choice.message.content)
        self.assertEqual(finish, choice.finish_reason)
        self.assertEqual(usage.completion_tokens, full.usage.completion_tokens)
        self.assertEqual(usage.prompt_tokens, full.usage.prompt_tokens)

    def test_completions_stop_strings(self):
        c = TEXT.client()
        base = greedy(c, "The history of the city begins", 24)
        text = base.choices[0].text
        self.assertEqual(base.usage.completion_tokens, 24)
        self.assertEqual(base.choices[0].finish_reason, "length")
        words = text.split()
        self.assertGreater(len(words), 3, text)
        stop = words[2]
        cut = greedy(c, "The history of the city begins", 24, stop=[stop, "\u2603never"])
        self.assertEqual(cut.choices[0].text, text[: text.index(stop)])
        self.assertEqual(cut.choices[0].finish_reason, "stop")

    def test_seed_makes_sampling_repeatable(self):
        c = TEXT.client()

        def sample(seed):
            return c.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                        seed=seed).choices[0].text

        self.assertEqual(sample(42), sample(42))
        self.assertGreater(len({sample(s) for s in range(1, 5)}), 1)

    def test_logprobs(self):
        c = TEXT.client()
        r = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Count: one, two,"}],
                                      max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), r.usage.completion_tokens)
        for t in content:
            self.assertLessEqual(t.logprob, 0)
            self.assertEqual(len(t.top_logprobs), 3)
            self.assertEqual(t.token, t.top_logprobs[0].token)  # greedy: the most likely
            self.assertAlmostEqual(t.logprob, t.top_logprobs[0].logprob, places=5)
            self.assertEqual(bytes(t.bytes).decode("utf-8", "replace"), t.token)
        comp = greedy(c, "one, two,", 4, logprobs=2)
        lp = comp.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 4)
        self.assertEqual(len(lp.top_logprobs[0]), 2)
        self.assertEqual("".join(lp.tokens), comp.choices[0].text)

    def test_errors(self):
        with self.assertRaises(openai.AuthenticationError):
            TEXT.client(key="wrong").models.list()
        c = TEXT.client()
        with self.assertRaises(openai.NotFoundError) as e:
            c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        self.assertIn("does not exist", str(e.exception))
        for bad in ({"temperature": -1}, {"response_format": {"type": "json_object"}},
                    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, {"n": 2},
                    {"max_tokens": 100000}):
            with self.assertRaises(openai.BadRequestError, msg=str(bad)) as e:
                c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], **bad)
            self.assertEqual(e.exception.status_code, 400)
        with self.assertRaises(openai.BadRequestError) as e:  # a text-only model
            c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}}]}])
        with self.assertRaises(openai.BadRequestError) as e:  # the server fetches nothing
            c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
        self.assertIn("fetches nothing", str(e.exception))
        auth = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
        status, _, body = TEXT.raw("POST", "/v1/chat/completions", b"{not json", auth)
        self.assertEqual(status, 400, body)
        status, _, body = TEXT.raw("POST", "/v1/completions", b'{"prompt":"' + b"a" * 2_000_000 + b'"}', auth)
        self.assertEqual(status, 413, body)
        self.assertIn("error", json.loads(body))
        status, _, body = TEXT.raw("GET", "/v1/nowhere", None, auth)
        self.assertEqual(status, 404, body)
        self.assertEqual(json.loads(body)["error"]["type"], "not_found_error")

    def test_sse_framing_with_curl(self):
        out = subprocess.run(
            ["curl", "-sN", "-i", TEXT.url + "/v1/completions", "-H", "Authorization: Bearer " + KEY, "-H",
             "Content-Type: application/json", "-d",
             json.dumps({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 5, "stream": True})],
            capture_output=True, timeout=120, check=True).stdout.decode()  # bytes: keep the \r\n
        head, _, body = out.partition("\r\n\r\n")
        self.assertRegex(head, r"(?i)content-type: text/event-stream")
        events = body.split("\n\n")
        self.assertEqual(events[-1], "")  # every event ends with a blank line
        events = events[:-1]
        self.assertEqual(events[-1], "data: [DONE]")
        for e in events[:-1]:
            self.assertTrue(e.startswith("data: {") or e.startswith(":"), e)
            if e.startswith("data: "):
                self.assertEqual(json.loads(e[6:])["object"], "text_completion")

    def test_32_concurrent_streaming_clients_equal_sequential_runs(self):
        prompts = [f"Chapter {i}: the {w} of the" for i, w in
                   enumerate(["river", "mountain", "city", "forest", "sea", "king", "storm", "road"] * 12)]
        want = [greedy(TEXT.client(), p, 8).choices[0].text for p in prompts]
        got = [None] * len(prompts)
        errors = []

        def client(t):
            c = TEXT.client()
            for k in range(3):
                i = t * 3 + k
                try:
                    text = ""
                    for chunk in c.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=8,
                                                      temperature=0, stream=True):
                        if chunk.choices:
                            text += chunk.choices[0].text
                    got[i] = text
                except Exception as ex:  # noqa: BLE001 - reported below
                    errors.append(repr(ex))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(got, want)

    def test_a_client_that_hangs_up_frees_its_request(self):
        before = TEXT.metric("gemma3:requests_disconnected_total")
        conn = http.client.HTTPConnection("127.0.0.1", TEXT.port, timeout=60)
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"prompt": "Once", "max_tokens": 900, "ignore_eos": True, "stream": True}),
                     headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        r.read1(64)
        r.read1(64)
        conn.sock.close()  # mid-stream
        conn.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            if (TEXT.metric("gemma3:requests_disconnected_total") == before + 1 and
                    TEXT.metric("gemma3:num_requests_running") == 0):
                break
            time.sleep(0.1)
        self.assertEqual(TEXT.metric("gemma3:requests_disconnected_total"), before + 1)
        self.assertEqual(TEXT.metric("gemma3:num_requests_running"), 0)
        self.assertEqual(TEXT.metric("gemma3:kv_cache_usage_perc"), 0)


def png_b64():
    path = os.path.join(os.path.dirname(__file__), "..", "data", "images", "rgba_64x64.png")
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


class Vision(unittest.TestCase):
    def test_a_pool_of_one_context_preempts_and_still_answers_the_same(self):
        # docs/batching.md, "Paged KV": 4 sequences share 256 positions; 4 requests of ~125
        # tokens each (45 + 80) run out of pages, the last admitted are preempted and run again.
        s = Server(ARGS.model, "-np", "4", "--ctx", "256", "--kv-tokens", "256", "--batch-invariant",
                   "--alias", MODEL_ID)
        try:
            prompts = [f"Story {i}. The old road wound through the {w}, past farms and mills and "
                       f"quiet villages, and every traveller who walked it told the same tale: once "
                       f"upon a time, in the {w}," for i, w in enumerate(["valley", "desert", "harbour", "forest"])]
            want = [greedy(s.client(), p, 80).choices[0].text for p in prompts]
            got = [None] * len(prompts)

            def run(i):
                got[i] = greedy(s.client(), prompts[i], 80).choices[0].text

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(got, want)
            metrics = urllib.request.urlopen(s.url + "/metrics", timeout=30).read().decode()
            m = re.search(r"^gemma3:num_preemptions_total (\d+)$", metrics, re.M)
            self.assertIsNotNone(m, metrics)
            self.assertGreater(int(m.group(1)), 0)
        finally:
            s.stop()

    def test_image_as_data_uri(self):
        s = Server(os.path.join(ARGS.vision), "-np", "2", "--ctx", "512")
        try:
            c = s.client()
            model = c.models.list().data[0].id
            msgs = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
                {"type": "text", "text": "What is this?"}]}]
            r = c.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
            self.assertGreater(r.usage.prompt_tokens, 16)  # the image's soft tokens count
            self.assertGreater(r.usage.completion_tokens, 0)
            bad = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                    b"\x89PNG\r\n\x1a\nbroken").decode()}}]}]
            with self.assertRaises(openai.BadRequestError):
                c.chat.completions.create(model=model, messages=bad, max_tokens=2)
        finally:
            s.stop()


class Busy(unittest.TestCase):
    def test_full_server_answers_503_and_sigterm_drains(self):
        s = Server(ARGS.model, "-np", "1", "--ctx", "512", "--max-concurrent", "1", "--shutdown-grace", "60")
        try:
            first = []

            def stream():
                c = s.client()
                text, finish = "", None
                for chunk in c.completions.create(model=MODEL_ID, prompt="Once", max_tokens=48, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True}):
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                    first.append(1)
                first.append((text, finish))

            t = threading.Thread(target=stream)
            t.start()
            while not first:
                time.sleep(0.01)
            with self.assertRaises(openai.InternalServerError) as e:
                s.client().completions.create(model=MODEL_ID, prompt="x", max_tokens=2)
            self.assertEqual(e.exception.status_code, 503)
            self.assertEqual(e.exception.response.headers.get("retry-after"), "1")
            s.proc.send_signal(signal.SIGTERM)  # the stream in flight finishes; the process exits 0
            t.join(120)
            self.assertEqual(s.proc.wait(120), 0, "".join(s.log))
            self.assertEqual(first[-1][1], "length")
        finally:
            s.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--gemma3", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--vision", required=True)
    ARGS, rest = p.parse_known_args()
    unittest.main(argv=[sys.argv[0], *rest])
