// libFuzzer target: arbitrary bytes through decode_image (format sniff, stb_image's PNG/JPEG/BMP/
// GIF decoders, the header limits and the allocation budget), and for images that decode,
// preprocess to a small size, Pan & Scan boxes with options taken from the input, crop and the
// Pan & Scan prompt. Error Statuses are expected; crashes, sanitizer reports, leaks and broken
// invariants are findings.
//
// Limits are modest (1 MiB pixels, 4096 per side) so one input stays far below libFuzzer's
// 2 GB RSS limit: the budget allows ~32 bytes per pixel, ~40 MB here.
#include <cmath>
#include <cstdint>
#include <span>

#include "fuzz_common.h"
#include "image/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gemma3::vision;
  ImageLimits limits;
  limits.max_file_bytes = 1 << 20;
  limits.max_pixels = 1 << 20;
  limits.max_side = 4096;
  gemma3::Result<Image> img = decode_image(std::span<const uint8_t>(data, size), "fuzz.img", limits);
  if (!img.ok()) {
    FUZZ_CHECK(!img.status().message().empty());
    return 0;
  }
  FUZZ_CHECK(img->width > 0 && img->height > 0);
  FUZZ_CHECK(img->width <= limits.max_side && img->height <= limits.max_side);
  FUZZ_CHECK(int64_t{img->width} * img->height <= limits.max_pixels);
  FUZZ_CHECK(img->rgb.size() == size_t(img->width) * img->height * 3);

  // Knobs from the last bytes (the image formats ignore trailing data mostly).
  const uint8_t k0 = data[size - 1], k1 = size > 1 ? data[size - 2] : 0;
  PreprocessOptions pre;
  pre.size = 1 + k0 % 40;
  const std::vector<float> px = preprocess(*img, pre);
  FUZZ_CHECK(px.size() == size_t(3) * pre.size * pre.size);
  for (float v : px) FUZZ_CHECK(v >= -1.0f && v <= 1.0f);  // mean = std = 0.5

  PanScanOptions pas;
  pas.min_crop = 1 + k1 % 64;
  pas.max_crops = 1 + (k1 >> 6) * 3;  // 1, 4, 7, 10
  pas.min_ratio = 1.0f + (k0 >> 5) * 0.1f;
  const std::vector<CropBox> boxes = pan_and_scan_boxes(img->width, img->height, pas);
  FUZZ_CHECK(boxes.size() <= size_t(pas.max_crops));
  PreprocessOptions small;
  small.size = 4;
  for (size_t i = 0; i < boxes.size(); ++i) {
    const CropBox& b = boxes[i];
    FUZZ_CHECK(b.x >= 0 && b.y >= 0 && b.width >= 0 && b.height >= 0);
    FUZZ_CHECK(int64_t{b.x} + b.width <= img->width && int64_t{b.y} + b.height <= img->height);
    if (i < 2) {  // cropping every box would only repeat the same code
      const Image c = crop(*img, b);
      FUZZ_CHECK(c.width == b.width || c.width == 0);
      const std::vector<float> cp = preprocess(c, small);
      FUZZ_CHECK(cp.empty() == (c.width == 0 || c.height == 0));
    }
  }
  const std::vector<PromptPiece> prompt = pan_and_scan_prompt(static_cast<int>(boxes.size()));
  size_t slots = 0;
  for (const PromptPiece& p : prompt) slots += p.image >= 0;
  FUZZ_CHECK(slots == boxes.size() + 1);
  return 0;
}
