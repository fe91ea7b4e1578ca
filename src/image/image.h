// Image input for the vision path: decoding (stb_image), Pan & Scan crop boxes, and the
// reference image processor's preprocessing (docs/architecture.md §3.1, §3.6).
//
// Everything here is pure host code on bytes and floats; nothing knows about the model.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "gemma3/status.h"

namespace gemma3::vision {

// An 8-bit RGB image, row-major, rgb.size() == width * height * 3.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

// Limits applied before and while decoding (decompression bombs, huge files). Each is checked
// before stb sees the file (the size from the header each format stores it in) and is a
// kInvalidFile error naming the limit (bad input: the CLI's exit 3); docs/reliability.md lists
// the messages. Decoding also runs under an allocation budget (kOutOfMemory past it).
struct ImageLimits {
  uint64_t max_file_bytes = uint64_t{64} << 20;  // 64 MiB
  int64_t max_pixels = int64_t{64} << 20;        // width * height, checked from the header
  int max_side = 16384;                          // either dimension
};

// The file-size limit alone, for a caller that reads the file itself: ok, or the kInvalidFile
// error decode_image / load_image give for `bytes` over limits.max_file_bytes.
Status check_image_file_size(uint64_t bytes, const std::string& name, const ImageLimits& limits = {});

// Decodes PNG, JPEG, BMP, GIF (first frame) to RGB: grayscale is expanded and transparent pixels
// are composited onto white, as transformers' convert_to_rgb does (the reference processor). A
// palette index past the entries a file gives is opaque black, as in Pillow. Top-down BMPs
// (negative height) are read. Errors name `name` (a file path or "<memory>").
Result<Image> decode_image(std::span<const uint8_t> bytes, const std::string& name,
                           const ImageLimits& limits = {});
// Reads and decodes a file (size checked before reading).
Result<Image> load_image(const std::string& path, const ImageLimits& limits = {});

// Resize to size x size ignoring aspect ratio with PIL's antialiased BILINEAR filter, then
// x = (pixel / 255 - mean) / std per channel. Returns channels-first [3, size, size] floats.
struct PreprocessOptions {
  int size = 896;
  float mean[3] = {0.5f, 0.5f, 0.5f};
  float std[3] = {0.5f, 0.5f, 0.5f};
};
std::vector<float> preprocess(const Image& image, const PreprocessOptions& options = {});

// Pan & Scan (HF Gemma3ImageProcessor): crop boxes cut from the original image, row-major.
// Empty when the image does not qualify (ratio below min_ratio, crops below min_crop).
struct PanScanOptions {
  int min_crop = 256;
  int max_crops = 4;
  float min_ratio = 1.2f;
};
struct CropBox {
  int x = 0, y = 0, width = 0, height = 0;
};
std::vector<CropBox> pan_and_scan_boxes(int width, int height, const PanScanOptions& options = {});
Image crop(const Image& image, const CropBox& box);

// How one user image appears in the prompt once Pan & Scan has run with n crops: pieces of
// text and image slots in order. Slot 0 is the original image, slots 1..n the crops. With
// n == 0 this is a single slot. Each slot is later expanded to the 260-token image sequence.
struct PromptPiece {
  std::string text;  // used when image < 0
  int image = -1;    // slot index, or -1 for text
};
std::vector<PromptPiece> pan_and_scan_prompt(int n_crops);

}  // namespace gemma3::vision
