#!/usr/bin/env python3
"""Tokenizer speed and memory: gemma3's built-in BPE against the SentencePiece library.

Encodes the same texts with the same vocabulary three ways, each in its own process:
  built-in     `gemma3 tokenize -f TEXT --stats`         (Tokenizer::encode)
  libspm       `gemma3 tokenize -f TEXT --stats --ref`   (Tokenizer::encode_ref: Debian's
               libsentencepiece called from C++ on the ModelProto the tokenizer builds)
  python-spm   the `sentencepiece` PyPI package on that same ModelProto (written with
               `gemma3 tokenize --export-model`), when `--python` names an interpreter that
               has it (optional; never needed by the tests)
and prints, per text and encoder: MB/s from the CPU time of the encode alone (the machine may
be shared; the wall-clock rate is printed too), the process's peak resident set, and the
encode's own peak memory per input byte: the kernel's high-water mark is reset right before
the encode ("5" > /proc/self/clear_refs) and read after it, minus the resident set before it
(the text is already read; the ids are counted). The encoders run alternately, `--repeat`
times each; the best rate and the largest memory count. The id counts must agree (the tests
check the ids themselves).

Texts: a generated English-like text (`--generate-mb`, words drawn with Zipf frequencies from
the GPL-3 text in /usr/share/common-licenses, punctuation, paragraphs; fixed seed), the
worst case for the built-in BPE (`--letters-mb`: random lowercase letters, no space or newline,
so no cut point: one chunk), and the files given with `--text` (.gz is decompressed), by
default /usr/share/doc/manpages/Changes.old.gz when it exists.

usage: tools/bench/tokenizer_bench.py -m MODEL.gguf [-g build/release/gemma3] [--repeat 3]
           [--generate-mb 4] [--letters-mb 1] [--text FILE ...] [--python /path/to/venv/bin/python]
"""

import argparse
import gzip
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

PYTHON_ENCODE = r"""
import sys, time
import sentencepiece as spm
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read()
open("/proc/self/clear_refs", "w").write("5")
rss_before = status_kb("VmRSS")
c0, t0 = time.process_time(), time.perf_counter()
ids = sp.encode(text)
c1, t1 = time.process_time(), time.perf_counter()
peak_extra = status_kb("VmHWM") - rss_before
print(f"ids {len(ids)} bytes {len(text.encode())} seconds {t1 - t0:.6f} cpu_seconds {c1 - c0:.6f} "
      f"peak_extra_kb {peak_extra}")
"""


def generate_text(path, megabytes, seed=1):
    """English-like text: GPL-3 words with Zipf weights, sentences, paragraphs."""
    source = "/usr/share/common-licenses/GPL-3"
    words = re.findall(r"[A-Za-z][a-z']*", open(source, encoding="utf-8").read())
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    vocab = sorted(counts, key=lambda w: -counts[w])
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    rng = random.Random(seed)
    out, size = [], 0
    target = int(megabytes * 1e6)
    while size < target:
        paragraph = []
        for _ in range(rng.randint(2, 8)):
            n = rng.randint(4, 25)
            sentence = rng.choices(vocab, weights, k=n)
            sentence[0] = sentence[0].capitalize()
            for i in range(1, n - 1):
                if rng.random() < 0.08:
                    sentence[i] += rng.choice([",", ",", ";", ":"])
                if rng.random() < 0.01:
                    sentence[i] = f"({sentence[i]})"
                if rng.random() < 0.01:
                    sentence[i] = str(rng.randint(0, 2030))
            paragraph.append(" ".join(sentence) + rng.choice([".", ".", ".", "?", "!"]))
        text = " ".join(paragraph) + "\n\n"
        out.append(text)
        size += len(text)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(out)[:target])


def run_measured(cmd):
    """Runs cmd, returning (parsed --stats fields, peak RSS bytes)."""
    # os.wait4 gives the child's own rusage (resource.RUSAGE_CHILDREN would be the max over all).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err}")
    fields = out.split()
    stats = {fields[i]: fields[i + 1] for i in range(0, len(fields) - 1, 2)}
    return stats, usage.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=os.path.expanduser("~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("-g", "--gemma3", default=None, help="the gemma3 binary (default: build/release, build/cpu)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--generate-mb", type=float, default=4.0)
    ap.add_argument("--letters-mb", type=float, default=0.0)
    ap.add_argument("--text", action="append", default=None)
    ap.add_argument("--python", default=None, help="a Python with the sentencepiece package")
    ap.add_argument("--no-libspm", action="store_true", help="skip the library through gemma3 (slow: ~0.2 MB/s)")
    args = ap.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    gemma3 = args.gemma3
    if gemma3 is None:
        for b in ("build/release/gemma3", "build/cpu/gemma3"):
            if os.access(os.path.join(root, b), os.X_OK):
                gemma3 = os.path.join(root, b)
                break
    if not gemma3 or not os.access(gemma3, os.X_OK):
        sys.exit("gemma3 binary not found: build it or pass -g")

    work = tempfile.mkdtemp(prefix="gemma3-tokbench.")
    try:
        texts = []
        if args.generate_mb > 0:
            path = os.path.join(work, "generated-english.txt")
            generate_text(path, args.generate_mb)
            texts.append(("generated English-like", path))
        if args.letters_mb > 0:
            path = os.path.join(work, "letters.txt")
            rng = random.Random(5)
            with open(path, "w") as f:
                f.write("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(int(args.letters_mb * 1e6))))
            texts.append(("random letters, no cut point", path))
        sources = args.text if args.text is not None else [
            p for p in ["/usr/share/doc/manpages/Changes.old.gz"] if os.path.exists(p)]
        for src in sources:
            path = os.path.join(work, os.path.basename(src).removesuffix(".gz"))
            opener = gzip.open if src.endswith(".gz") else open
            with opener(src, "rb") as f, open(path, "wb") as g:
                shutil.copyfileobj(f, g)
            texts.append((src, path))

        encoders = [("built-in", [gemma3, "tokenize", "-m", args.model, "--stats", "-f"])]
        if not args.no_libspm:
            encoders.append(("libspm", [gemma3, "tokenize", "-m", args.model, "--stats", "--ref", "-f"]))
        if args.python:
            model = os.path.join(work, "gemma3.model")
            subprocess.run([gemma3, "tokenize", "-m", args.model, "--export-model", model], check=True)
            script = os.path.join(work, "spm_encode.py")
            with open(script, "w") as f:
                f.write(PYTHON_ENCODE)
            encoders.append(("python-spm", [args.python, script, model]))

        print(f"gemma3: {gemma3}\nmodel: {args.model}\nrepeat: {args.repeat}\n")
        print("| text | bytes | encoder | ids | MB/s (CPU) | MB/s (wall) | peak RSS MB | encode peak, bytes / input byte |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for label, path in texts:
            size = os.path.getsize(path)
            best = {}
            for _ in range(args.repeat):
                for name, cmd in encoders:  # alternate, so background load hits all alike
                    stats, rss = run_measured(cmd + [path])
                    cpu = float(stats["cpu_seconds"])
                    wall = float(stats["seconds"])
                    extra = int(stats.get("peak_extra_kb", -1)) * 1024
                    b = best.setdefault(name, {"cpu": cpu, "wall": wall, "rss": rss, "extra": extra, "ids": stats["ids"]})
                    b["cpu"], b["wall"] = min(b["cpu"], cpu), min(b["wall"], wall)
                    b["rss"], b["extra"] = max(b["rss"], rss), max(b["extra"], extra)
            for name, _ in encoders:
                b = best[name]
                extra = f"{b['extra'] / size:.2f}" if b["extra"] >= 0 else "n/a"
                print(f"| {label} | {size} | {name} | {b['ids']} | {size / 1e6 / b['cpu']:.2f} | "
                      f"{size / 1e6 / b['wall']:.2f} | {b['rss'] / 2**20:.1f} | {extra} |")
            counts = {best[n]["ids"] for n, _ in encoders}
            if len(counts) != 1:
                sys.exit(f"id counts differ on {label}: {[(n, best[n]['ids']) for n, _ in encoders]}")
            for name, _ in encoders[1:]:
                print(f"| {label} | | built-in / {name} | | {best[name]['cpu'] / best['built-in']['cpu']:.1f}x | "
                      f"{best[name]['wall'] / best['built-in']['wall']:.1f}x | | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
