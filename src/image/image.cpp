// preprocess (Pillow's BILINEAR resize + rescale/normalize), Pan & Scan boxes, crop and the
// Pan & Scan prompt layout (image.h; docs/architecture.md §3.1, §3.6).
#include "image/image.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

namespace gemma3::vision {
namespace {

// ---- Pillow's resample, 8 bits per channel (libImaging/Resample.c, same arithmetic) --------
// Per output pixel a window [first, first + count) of input pixels and fixed-point weights
// with 22 fractional bits. When downscaling, the triangle filter's support widens by the scale
// factor (antialiasing). Weights are computed in double exactly as Pillow does, so the integer
// weights, and therefore every output code, are the same.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Taps {
  int ksize = 0;                // weights per output pixel (padded with zeros)
  std::vector<int> first;       // [out]
  std::vector<int> count;       // [out]
  std::vector<int32_t> weight;  // [out, ksize]
};

double triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

Taps bilinear_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;  // BILINEAR's support is 1
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weight.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    // C truncation toward zero, then clamping, as in Pillow.
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = triangle((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? k[x] / ww : k[x];
      t.weight[static_cast<size_t>(xx) * t.ksize + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    t.first[xx] = xmin;
    t.count[xx] = std::max(xmax, 0);
  }
  return t;
}

uint8_t clip8(int32_t acc) { return static_cast<uint8_t>(std::clamp(acc >> kPrecisionBits, 0, 255)); }

// One pass of the separable resize along x (horizontal) or y (vertical) of interleaved RGB
// [h, w, 3], rounded and clipped to 8 bits as Pillow stores its intermediate image.
std::vector<uint8_t> pass(const std::vector<uint8_t>& in, int w, int h, int out, bool horizontal) {
  const Taps t = bilinear_taps(horizontal ? w : h, out);
  const int ow = horizontal ? out : w, oh = horizontal ? h : out;
  std::vector<uint8_t> res(size_t(ow) * oh * 3);
  const size_t step = horizontal ? 3 : size_t(w) * 3;  // distance between taps, in bytes
  for (int y = 0; y < oh; ++y) {
    for (int x = 0; x < ow; ++x) {
      const int o = horizontal ? x : y;  // the output index along the pass
      const int32_t* k = t.weight.data() + size_t(o) * t.ksize;
      const uint8_t* p = horizontal ? in.data() + (size_t(y) * w + t.first[o]) * 3
                                    : in.data() + (size_t(t.first[o]) * w + x) * 3;
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int i = 0; i < t.count[o]; ++i, p += step) s0 += p[0] * k[i], s1 += p[1] * k[i], s2 += p[2] * k[i];
      uint8_t* d = res.data() + (size_t(y) * ow + x) * 3;
      d[0] = clip8(s0), d[1] = clip8(s1), d[2] = clip8(s2);
    }
  }
  return res;
}

// Resizes interleaved RGB [in_h, in_w, 3] to [out_h, out_w, 3] with two 8-bit passes. A pass
// whose size does not change is skipped, as in Pillow. The order matters by one code here and
// there: Pillow 13 (libImaging/Resample.c, ImagingResampleInner) runs the vertical pass first
// when the height shrinks by more than twice what the width does, horizontal first otherwise
// (older Pillow releases always went horizontal first).
std::vector<uint8_t> resize_bilinear(const uint8_t* in, int in_w, int in_h, int out_w, int out_h) {
  std::vector<uint8_t> cur(in, in + size_t(in_w) * in_h * 3);
  const int64_t shrink_y = int64_t{in_h} - out_h, shrink_x = int64_t{in_w} - out_w;
  const bool horizontal_first = !(shrink_y > 0 && shrink_y > shrink_x * 2);
  int w = in_w, h = in_h;
  for (bool horizontal : {horizontal_first, !horizontal_first}) {
    if (horizontal && out_w != w) cur = pass(cur, w, h, out_w, true), w = out_w;
    if (!horizontal && out_h != h) cur = pass(cur, w, h, out_h, false), h = out_h;
  }
  return cur;
}

// Pillow/Python compare the aspect ratio with min_ratio as a double (1.2), but the option is a
// float (1.2f = 1.2000000477): widening it would turn "ratio 1.2 activates" into "does not".
// Its shortest decimal form is what the user wrote, so parse that as a double.
double as_written(float v) { return std::strtod(fmt::format("{}", v).c_str(), nullptr); }

}  // namespace

std::vector<float> preprocess(const Image& image, const PreprocessOptions& options) {
  const int s = options.size;
  if (s <= 0 || image.width <= 0 || image.height <= 0 ||
      image.rgb.size() != size_t(image.width) * size_t(image.height) * 3) {
    return {};  // nothing sensible to resize; callers check the shape
  }
  // [s, s, 3] interleaved codes, exactly Pillow's Image.resize((s, s), BILINEAR).
  const std::vector<uint8_t> codes = resize_bilinear(image.rgb.data(), image.width, image.height, s, s);
  // The reference: numpy rescale in float64 then cast to float32, then (x - mean) / std in float32.
  constexpr double kRescale = 1.0 / 255.0;
  std::vector<float> out(size_t(3) * s * s);
  const size_t plane = size_t(s) * s;
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) {
      const float x = static_cast<float>(codes[i * 3 + c] * kRescale);
      out[c * plane + i] = (x - options.mean[c]) / options.std[c];
    }
  }
  return out;
}

std::vector<CropBox> pan_and_scan_boxes(int width, int height, const PanScanOptions& options) {
  // Mirrors Gemma3ImageProcessor.pan_and_scan (transformers 5.24), in Python's double arithmetic.
  // Options HF would divide by zero on (min_crop 0) or cannot honour (max_crops < 1) give none.
  if (width <= 0 || height <= 0 || options.min_crop <= 0 || options.max_crops < 1) return {};
  const double w = width, h = height, min_ratio = as_written(options.min_ratio);
  int64_t nw = 1, nh = 1;
  if (width >= height) {
    if (w / h < min_ratio) return {};
    nw = static_cast<int64_t>(std::floor(w / h + 0.5));  // round half up
    nw = std::min(static_cast<int64_t>(std::floor(w / options.min_crop)), nw);
    nw = std::min<int64_t>(options.max_crops, std::max<int64_t>(2, nw));
  } else {
    if (h / w < min_ratio) return {};
    nh = static_cast<int64_t>(std::floor(h / w + 0.5));
    nh = std::min(static_cast<int64_t>(std::floor(h / options.min_crop)), nh);
    nh = std::min<int64_t>(options.max_crops, std::max<int64_t>(2, nh));
  }
  const int64_t cw = static_cast<int64_t>(std::ceil(w / nw));
  const int64_t ch = static_cast<int64_t>(std::ceil(h / nh));
  if (std::min(cw, ch) < options.min_crop) return {};
  std::vector<CropBox> boxes;
  for (int64_t j = 0; j < nh; ++j) {
    for (int64_t i = 0; i < nw; ++i) {
      // Python slicing clips at the border: the last crop may be narrower (or, with tiny
      // min_crop, even empty).
      const int64_t x = std::min<int64_t>(cw * i, width), y = std::min<int64_t>(ch * j, height);
      boxes.push_back({static_cast<int>(x), static_cast<int>(y), static_cast<int>(std::min(cw, width - x)),
                       static_cast<int>(std::min(ch, height - y))});
    }
  }
  return boxes;
}

Image crop(const Image& image, const CropBox& box) {
  // Clipped to the image like a Python slice; an empty or invalid box gives an empty image.
  if (image.rgb.size() != size_t(std::max(image.width, 0)) * size_t(std::max(image.height, 0)) * 3) return {};
  const int64_t x0 = std::clamp<int64_t>(box.x, 0, image.width);
  const int64_t y0 = std::clamp<int64_t>(box.y, 0, image.height);
  const int64_t x1 = std::clamp<int64_t>(int64_t{box.x} + std::max(box.width, 0), x0, image.width);
  const int64_t y1 = std::clamp<int64_t>(int64_t{box.y} + std::max(box.height, 0), y0, image.height);
  Image out;
  if (x1 == x0 || y1 == y0) return out;
  out.width = static_cast<int>(x1 - x0);
  out.height = static_cast<int>(y1 - y0);
  out.rgb.resize(size_t(out.width) * out.height * 3);
  for (int64_t y = y0; y < y1; ++y) {
    const uint8_t* src = image.rgb.data() + (size_t(y) * image.width + x0) * 3;
    std::copy(src, src + size_t(out.width) * 3, out.rgb.data() + size_t(y - y0) * out.width * 3);
  }
  return out;
}

std::vector<PromptPiece> pan_and_scan_prompt(int n_crops) {
  // Gemma3Processor.replace_image_token: "Here is the original image " + IMG +
  // " and here are some crops to help you see better " + " ".join([IMG] * n).
  std::vector<PromptPiece> pieces;
  if (n_crops <= 0) {
    pieces.push_back({"", 0});
    return pieces;
  }
  pieces.push_back({"Here is the original image ", -1});
  pieces.push_back({"", 0});
  pieces.push_back({" and here are some crops to help you see better ", -1});
  for (int i = 1; i <= n_crops; ++i) {
    if (i > 1) pieces.push_back({" ", -1});
    pieces.push_back({"", i});
  }
  return pieces;
}

}  // namespace gemma3::vision
