#!/usr/bin/env python3
"""Writes the image test inputs and their goldens for tests/test_image.cpp.

  tests/data/images/*.{png,jpg,bmp,gif}  small synthetic images (numpy PCG64, then Pillow's encoders)
  tests/data/goldens/images.json         what Pillow + transformers' Gemma3ImageProcessorPil make of them

Nothing here runs the engine. References:
  * decoding: PIL.Image.open + transformers' convert_to_rgb (image_transforms.py), the processor's
    own first step. Images with alpha (or a transparency key) are composited onto WHITE by it,
    not merely stripped of alpha.
  * preprocessing: Gemma3ImageProcessorPil (the slow PIL backend: Image.resize BILINEAR, then
    numpy rescale 1/255 in float64 -> float32, then (x - 0.5) / 0.5 in float32).
  * Pan & Scan boxes: Gemma3ImageProcessorPil.pan_and_scan called on index images (each crop's
    first element is its row / column offset), for a table of sizes.
  * Pan & Scan prompt: Gemma3Processor.replace_image_token, the HF code path itself, called on a
    stand-in object whose full_image_sequence is a sentinel (no tokenizer needed); the text is
    split at the sentinel into pieces.

Regenerate (from the repository root; pillow 13.0.0, transformers 5.24.0, numpy 2.4.6 made the
committed files):
    pip install pillow transformers numpy
    python3 tools/reference/make_image_goldens.py

Storage. Every processor output value is ((code * (1/255) as float32) - 0.5) / 0.5 for an
8-bit code (the resize output); the script asserts this bit for bit and stores the codes
(base64 of uint8 [3, S, S]) for sizes 32 and 64, and every 997th code of the [3, 896, 896]
output plus exact float per-channel mean/std/min/max computed from the processor's floats.
Decoded pixels: FNV-1a 64 of the RGB bytes (the lossless formats must match bit for bit); for
JPEG the full reference RGB (libjpeg-turbo via Pillow) as base64, since stb_image's IDCT and
chroma upsampling differ from libjpeg's.
"""

import base64
import json
import math
import os
import sys

import numpy as np
import PIL
from PIL import Image
import transformers
from transformers.image_transforms import convert_to_rgb
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMG_DIR = os.path.join(ROOT, "tests", "data", "images")
OUT = os.path.join(ROOT, "tests", "data", "goldens", "images.json")
STRIDE_896 = 997


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode()


def pattern(rng, w, h):
    """RGB uint8 [h, w, 3]: gradients, a fine stripe band (aliases without antialiasing), noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(x * 0.9) * np.cos(y * 0.7)
    img = np.stack([r, g, b], axis=-1)
    img[:, : w // 10] += rng.normal(0, 40, size=(h, w // 10, 1))  # a noisy band
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_images():
    rng = np.random.Generator(np.random.PCG64(20260527))
    os.makedirs(IMG_DIR, exist_ok=True)
    files = []

    def save(name, im, **kw):
        im.save(os.path.join(IMG_DIR, name), **kw)
        files.append(name)

    save("rgb_300x90.png", Image.fromarray(pattern(rng, 300, 90), "RGB"), optimize=True)
    rgba = np.dstack([pattern(rng, 64, 64), np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))])
    rgba[:8, :8, 3] = 0  # fully transparent corner: composited to white whatever its colour
    save("rgba_64x64.png", Image.fromarray(rgba, "RGBA"))
    save("gray_50x160.png", Image.fromarray(pattern(rng, 50, 160)[..., 1] ^ pattern(rng, 50, 160)[..., 2], "L"))
    la = np.dstack([pattern(rng, 23, 37)[..., 0], rng.integers(0, 256, size=(37, 23), dtype=np.uint8)])
    save("la_23x37.png", Image.fromarray(la, "LA"))
    pal = Image.fromarray(pattern(rng, 33, 17), "RGB").quantize(colors=16)
    save("pal_trns_33x17.png", pal, transparency=3)  # palette PNG with a tRNS entry
    save("photo_96x64.jpg", Image.fromarray(pattern(rng, 96, 64), "RGB"), quality=90, subsampling=2)
    save("rgb_37x23.bmp", Image.fromarray(pattern(rng, 37, 23), "RGB"))  # 24-bit, padded rows
    f0 = Image.fromarray(pattern(rng, 40, 30), "RGB").quantize(colors=32)
    f1 = Image.fromarray(255 - pattern(rng, 40, 30), "RGB").quantize(colors=32)
    save("anim_40x30.gif", f0, save_all=True, append_images=[f1], transparency=5, duration=100, loop=0)
    return files


def reference_rgb(path):
    with Image.open(path) as im:
        return np.asarray(convert_to_rgb(im, return_numpy=True)), im.format


def processor(size):
    return Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, resample=2, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False)


def to_codes(pv: np.ndarray) -> np.ndarray:
    """Recovers the 8-bit codes from processor floats and checks the mapping is exact."""
    codes = np.rint((pv.astype(np.float64) * 0.5 + 0.5) * 255).astype(np.int64)
    assert codes.min() >= 0 and codes.max() <= 255
    codes = codes.astype(np.uint8)
    back = ((codes.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(back.view(np.uint32), pv.astype(np.float32).view(np.uint32)), "code map not exact"
    return codes


def preprocess_goldens(path):
    out = {}
    for size in (32, 64, 896):
        with Image.open(path) as im:
            pv = processor(size)(im, return_tensors="np")["pixel_values"][0]
        assert pv.shape == (3, size, size) and pv.dtype == np.float32
        codes = to_codes(pv)
        if size < 896:
            out[str(size)] = {"codes_b64": b64(codes), "first_values": [float(v) for v in pv.reshape(-1)[:12]]}
        else:
            flat = codes.reshape(-1)
            pvd = pv.astype(np.float64)
            out["896"] = {
                "stride": STRIDE_896,
                "sample_codes_b64": b64(flat[::STRIDE_896]),
                "mean": [float(pvd[c].mean()) for c in range(3)],
                "std": [float(pvd[c].std()) for c in range(3)],
                "min": [float(pv[c].min()) for c in range(3)],
                "max": [float(pv[c].max()) for c in range(3)],
            }
    return out


PAS_SIZES = [  # (width, height)
    (896, 896), (1792, 896), (896, 1792), (600, 300), (300, 900), (10, 10), (8000, 2000), (2000, 8000),
    (1190, 1000), (1210, 1000), (1200, 1000), (1000, 1200), (1000, 1199), (1024, 256), (1023, 256),
    (1280, 256), (2560, 256), (513, 256), (511, 256), (4000, 500), (333, 1000), (3001, 1000),
    (2500, 1000), (2499, 1000), (768, 256), (257, 1024), (300, 90), (1000, 1000), (640, 480),
    (480, 640), (3000, 1000), (1536, 256),
]


def pas_boxes(w, h, min_crop=256, max_crops=4, min_ratio=1.2):
    p = Gemma3ImageProcessorPil()
    rows = np.broadcast_to(np.arange(h, dtype=np.int32)[None, :, None], (1, h, w))
    cols = np.broadcast_to(np.arange(w, dtype=np.int32)[None, None, :], (1, h, w))
    kw = dict(pan_and_scan_min_crop_size=min_crop, pan_and_scan_max_num_crops=max_crops,
              pan_and_scan_min_ratio_to_activate=min_ratio)
    by_rows = p.pan_and_scan(rows, **kw)
    by_cols = p.pan_and_scan(cols, **kw)
    assert len(by_rows) == len(by_cols)
    return [[int(c[0, 0, 0]), int(r[0, 0, 0]), int(c.shape[2]), int(c.shape[1])] for r, c in zip(by_rows, by_cols)]


class _PromptStandIn:
    full_image_sequence = "\x00IMG\x00"


def prompt_pieces(n):
    text = Gemma3Processor.replace_image_token(_PromptStandIn(), {"num_crops": [n]}, 0)
    parts = text.split(_PromptStandIn.full_image_sequence)
    pieces = []
    for i, t in enumerate(parts):
        if t:
            pieces.append({"text": t})
        if i + 1 < len(parts):
            pieces.append({"image": i})
    return pieces


def synthetic(w, h):
    """The formula image the C++ test rebuilds: r = (3x + 5y) & 255, g = (x*y) & 255, b = (x ^ y) & 255."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    return np.stack([(3 * x + 5 * y) & 255, (x * y) & 255, (x ^ y) & 255], axis=-1).astype(np.uint8)


def pas_processor_case(w, h, size=32):
    """The whole processor with do_pan_and_scan on: num_crops and each output's codes."""
    p = Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, resample=2, rescale_factor=1 / 255, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    r = p(Image.fromarray(synthetic(w, h), "RGB"), return_tensors="np")
    n = int(np.asarray(r["num_crops"]).reshape(-1)[0])
    pv = r["pixel_values"]
    assert pv.shape[0] == n + 1
    return {"width": w, "height": h, "size": size, "num_crops": n,
            "codes_b64": [b64(to_codes(pv[i])) for i in range(n + 1)]}


def main():
    files = make_images()
    images = []
    for name in files:
        path = os.path.join(IMG_DIR, name)
        rgb, fmt = reference_rgb(path)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        h, w = rgb.shape[:2]
        entry = {"file": name, "format": fmt, "width": w, "height": h, "bytes": os.path.getsize(path),
                 "exact": fmt != "JPEG", "rgb_fnv1a64": fnv1a64(rgb.tobytes())}
        if fmt == "JPEG":
            entry["rgb_b64"] = b64(rgb)
        entry["preprocess"] = preprocess_goldens(path)
        images.append(entry)
        print(f"{name}: {fmt} {w}x{h}, {entry['bytes']} bytes", file=sys.stderr)

    doc = {
        "generator": "tools/reference/make_image_goldens.py",
        "versions": {"pillow": PIL.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "images": images,
        "pan_and_scan": {
            "options": {"min_crop": 256, "max_crops": 4, "min_ratio": 1.2},
            "cases": [{"width": w, "height": h, "boxes": pas_boxes(w, h)} for w, h in PAS_SIZES],
            "other_options": [
                {"min_crop": mc, "max_crops": mx, "min_ratio": mr, "width": w, "height": h,
                 "boxes": pas_boxes(w, h, mc, mx, mr)}
                for (mc, mx, mr, w, h) in [(100, 8, 1.5, 1000, 100), (64, 3, 1.1, 700, 600), (32, 6, 2.0, 100, 700),
                                          (256, 2, 1.2, 3000, 1000), (128, 4, 1.0, 512, 512)]
            ],
        },
        "pan_and_scan_processor": [pas_processor_case(768, 256), pas_processor_case(300, 700),
                                   pas_processor_case(600, 500)],
        "prompt": [{"n_crops": n, "pieces": prompt_pieces(n)} for n in range(0, 5)],
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
