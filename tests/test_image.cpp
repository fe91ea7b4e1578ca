// Image input (src/vision/image.h) against Pillow and transformers' Gemma3ImageProcessorPil:
// tests/data/goldens/images.json, written by tools/reference/make_image_goldens.py from the
// committed images in tests/data/images/. Also the limits and every class of bad image.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "vision/image.h"

namespace gemma3::vision {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kImages = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/images/";

const json& goldens() {
  static const json doc = [] {
    std::ifstream f(std::string(GEMMA3_SOURCE_DIR) + "/tests/data/goldens/images.json");
    return f.good() ? json::parse(f) : json();
  }();
  return doc;
}

std::vector<uint8_t> base64(const std::string& s) {
  static const std::string abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::vector<uint8_t> out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : s) {
    const size_t v = abc.find(c);
    if (v == std::string::npos) continue;  // '=' padding
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<uint8_t>(acc >> bits));
    }
  }
  return out;
}

std::string fnv1a64(const std::vector<uint8_t>& bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t b : bytes) h = (h ^ b) * 0x100000001b3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The processor's value for an 8-bit resize code: numpy's float64 rescale cast to float32, then
// (x - 0.5) / 0.5 in float32. make_image_goldens.py asserts this map reproduces every processor
// output bit for bit, so codes are a lossless encoding of the goldens.
float code_value(uint8_t code) { return (static_cast<float>(code * (1.0 / 255.0)) - 0.5f) / 0.5f; }

// Max |ours - expected| over a [3, s, s] output, expected given as codes.
double max_diff(const std::vector<float>& ours, const std::vector<uint8_t>& codes) {
  double m = 0;
  for (size_t i = 0; i < codes.size(); ++i)
    m = std::max(m, std::fabs(double(ours[i]) - code_value(codes[i])));
  return m;
}

// The pixels the processor saw: our decode for the lossless formats (checked bit-exact below),
// Pillow's own decode for JPEG, so preprocessing is tested apart from decoder differences.
Image reference_pixels(const json& entry) {
  if (entry["exact"].get<bool>()) {
    Result<Image> img = load_image(kImages + entry["file"].get<std::string>());
    return img.ok() ? *img : Image{};
  }
  return Image{entry["width"].get<int>(), entry["height"].get<int>(),
               base64(entry["rgb_b64"].get<std::string>())};
}

class ImageGoldens : public ::testing::Test {
 protected:
  void SetUp() override {
    if (goldens().is_null()) GTEST_SKIP() << "tests/data/goldens/images.json missing";
  }
};

TEST_F(ImageGoldens, DecodeMatchesPillow) {
  ASSERT_GE(goldens()["images"].size(), 6u);
  for (const json& e : goldens()["images"]) {
    SCOPED_TRACE(e["file"].get<std::string>());
    Result<Image> img = load_image(kImages + e["file"].get<std::string>());
    ASSERT_TRUE(img.ok()) << img.status().message();
    ASSERT_EQ(img->width, e["width"].get<int>());
    ASSERT_EQ(img->height, e["height"].get<int>());
    ASSERT_EQ(img->rgb.size(), size_t(img->width) * img->height * 3);
    if (e["exact"].get<bool>()) {
      // PNG (RGB, RGBA, L, LA, palette+tRNS), BMP and GIF are lossless: bit-exact, including the
      // alpha composite onto white.
      EXPECT_EQ(fnv1a64(img->rgb), e["rgb_fnv1a64"].get<std::string>());
      continue;
    }
    // JPEG: stb_image and libjpeg-turbo (Pillow) differ in IDCT rounding and in the 4:2:0
    // chroma upsampling filter; both are conforming decoders (the JPEG standard allows +-1 per
    // IDCT output). On this 96x64 q90 4:2:0 image we measured max |diff| = 2 codes, mean 0.07
    // (93% of values equal). The bounds leave room for other libjpeg-turbo builds and still
    // catch a wrong colour transform or a shifted block (tens of codes).
    const std::vector<uint8_t> ref = base64(e["rgb_b64"].get<std::string>());
    ASSERT_EQ(ref.size(), img->rgb.size());
    EXPECT_EQ(fnv1a64(ref), e["rgb_fnv1a64"].get<std::string>());
    int worst = 0;
    double sum = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const int d = std::abs(int(ref[i]) - int(img->rgb[i]));
      worst = std::max(worst, d);
      sum += d;
    }
    EXPECT_LE(worst, 4);
    EXPECT_LE(sum / ref.size(), 0.3);
  }
}

// Pillow's resize is integer arithmetic on exactly reproduced weights, so we expect every code
// equal (max diff 0). The bound allowed by the task would be one code, 1/127.5 = 0.00784.
TEST_F(ImageGoldens, PreprocessMatchesProcessorSmallSizes) {
  for (const json& e : goldens()["images"]) {
    SCOPED_TRACE(e["file"].get<std::string>());
    const Image img = reference_pixels(e);
    ASSERT_GT(img.width, 0);
    for (int size : {32, 64}) {
      SCOPED_TRACE(size);
      const json& g = e["preprocess"][std::to_string(size)];
      const std::vector<uint8_t> codes = base64(g["codes_b64"].get<std::string>());
      ASSERT_EQ(codes.size(), size_t(3) * size * size);
      PreprocessOptions opt;
      opt.size = size;
      const std::vector<float> ours = preprocess(img, opt);
      ASSERT_EQ(ours.size(), codes.size());
      EXPECT_EQ(max_diff(ours, codes), 0.0);
      const json& first = g["first_values"];  // raw processor floats, independent of code_value
      for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(ours[i], first[i].get<float>()) << i;
    }
  }
}

TEST_F(ImageGoldens, PreprocessMatchesProcessorAt896) {
  for (const json& e : goldens()["images"]) {
    SCOPED_TRACE(e["file"].get<std::string>());
    const Image img = reference_pixels(e);
    const std::vector<float> ours = preprocess(img);  // defaults: 896, mean = std = 0.5
    ASSERT_EQ(ours.size(), size_t(3) * 896 * 896);
    const json& g = e["preprocess"]["896"];
    const size_t stride = g["stride"].get<size_t>();
    const std::vector<uint8_t> sample = base64(g["sample_codes_b64"].get<std::string>());
    ASSERT_EQ(sample.size(), (ours.size() + stride - 1) / stride);
    double worst = 0;
    for (size_t i = 0; i < sample.size(); ++i)
      worst = std::max(worst, std::fabs(double(ours[i * stride]) - code_value(sample[i])));
    EXPECT_EQ(worst, 0.0);
    const size_t plane = size_t(896) * 896;
    for (int c = 0; c < 3; ++c) {
      double sum = 0, sq = 0;
      float lo = ours[c * plane], hi = lo;
      for (size_t i = 0; i < plane; ++i) {
        const double v = ours[c * plane + i];
        sum += v;
        sq += v * v;
        lo = std::min(lo, ours[c * plane + i]);
        hi = std::max(hi, ours[c * plane + i]);
      }
      const double mean = sum / plane, sd = std::sqrt(std::max(sq / plane - mean * mean, 0.0));
      // Equal floats; only the summation order differs from numpy's (pairwise) mean/std.
      EXPECT_NEAR(mean, g["mean"][c].get<double>(), 1e-9) << c;
      EXPECT_NEAR(sd, g["std"][c].get<double>(), 1e-7) << c;
      EXPECT_EQ(lo, g["min"][c].get<float>()) << c;
      EXPECT_EQ(hi, g["max"][c].get<float>()) << c;
    }
  }
}

TEST_F(ImageGoldens, PanAndScanBoxes) {
  const json& p = goldens()["pan_and_scan"];
  auto check = [](const json& c, const PanScanOptions& opt) {
    SCOPED_TRACE(testing::Message() << c["width"] << "x" << c["height"]);
    const std::vector<CropBox> boxes = pan_and_scan_boxes(c["width"].get<int>(), c["height"].get<int>(), opt);
    ASSERT_EQ(boxes.size(), c["boxes"].size());
    for (size_t i = 0; i < boxes.size(); ++i) {
      const json& b = c["boxes"][i];
      EXPECT_EQ(boxes[i].x, b[0].get<int>()) << i;
      EXPECT_EQ(boxes[i].y, b[1].get<int>()) << i;
      EXPECT_EQ(boxes[i].width, b[2].get<int>()) << i;
      EXPECT_EQ(boxes[i].height, b[3].get<int>()) << i;
    }
  };
  ASSERT_GE(p["cases"].size(), 20u);
  for (const json& c : p["cases"]) check(c, PanScanOptions{});
  for (const json& c : p["other_options"]) {
    PanScanOptions opt;
    opt.min_crop = c["min_crop"].get<int>();
    opt.max_crops = c["max_crops"].get<int>();
    opt.min_ratio = c["min_ratio"].get<float>();
    check(c, opt);
  }
}

// The whole processor with do_pan_and_scan on a formula image: crop() then preprocess() of the
// original and each crop must give the processor's pixel_values.
TEST_F(ImageGoldens, PanAndScanThroughProcessor) {
  for (const json& c : goldens()["pan_and_scan_processor"]) {
    const int w = c["width"].get<int>(), h = c["height"].get<int>(), size = c["size"].get<int>();
    SCOPED_TRACE(testing::Message() << w << "x" << h);
    Image img{w, h, std::vector<uint8_t>(size_t(w) * h * 3)};
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w; ++x) {
        uint8_t* p = img.rgb.data() + (size_t(y) * w + x) * 3;
        p[0] = uint8_t((3 * x + 5 * y) & 255), p[1] = uint8_t((x * y) & 255), p[2] = uint8_t((x ^ y) & 255);
      }
    }
    const std::vector<CropBox> boxes = pan_and_scan_boxes(w, h);
    ASSERT_EQ(int(boxes.size()), c["num_crops"].get<int>());
    PreprocessOptions opt;
    opt.size = size;
    for (size_t i = 0; i <= boxes.size(); ++i) {
      const Image part = i == 0 ? img : crop(img, boxes[i - 1]);
      const std::vector<uint8_t> codes = base64(c["codes_b64"][i].get<std::string>());
      const std::vector<float> ours = preprocess(part, opt);
      ASSERT_EQ(ours.size(), codes.size()) << i;
      EXPECT_EQ(max_diff(ours, codes), 0.0) << i;
    }
  }
}

TEST_F(ImageGoldens, PanAndScanPrompt) {
  for (const json& c : goldens()["prompt"]) {
    const int n = c["n_crops"].get<int>();
    SCOPED_TRACE(n);
    const std::vector<PromptPiece> pieces = pan_and_scan_prompt(n);
    ASSERT_EQ(pieces.size(), c["pieces"].size());
    for (size_t i = 0; i < pieces.size(); ++i) {
      const json& want = c["pieces"][i];
      if (want.contains("image")) {
        EXPECT_EQ(pieces[i].image, want["image"].get<int>()) << i;
      } else {
        EXPECT_EQ(pieces[i].image, -1) << i;
        EXPECT_EQ(pieces[i].text, want["text"].get<std::string>()) << i;
      }
    }
  }
}

TEST(ImageCrop, ClipsLikeASlice) {
  Image img{4, 3, {}};
  for (int i = 0; i < 36; ++i) img.rgb.push_back(uint8_t(i));
  Image c = crop(img, {1, 1, 2, 5});  // height clipped to 2
  ASSERT_EQ(c.width, 2);
  ASSERT_EQ(c.height, 2);
  EXPECT_EQ(c.rgb, (std::vector<uint8_t>{15, 16, 17, 18, 19, 20, 27, 28, 29, 30, 31, 32}));
  EXPECT_EQ(crop(img, {4, 0, 3, 3}).width, 0);  // starts past the border
  EXPECT_EQ(crop(img, {-5, -5, 2, 2}).width, 0);
  EXPECT_TRUE(preprocess(Image{}).empty());  // nothing to resize: empty, not a crash
  EXPECT_TRUE(preprocess(Image{2, 2, {1, 2, 3}}).empty());
}

TEST(ImagePanScan, DegenerateInputs) {
  EXPECT_TRUE(pan_and_scan_boxes(0, 100).empty());
  EXPECT_TRUE(pan_and_scan_boxes(-3, -3).empty());
  PanScanOptions zero;
  zero.min_crop = 0;
  EXPECT_TRUE(pan_and_scan_boxes(4000, 100, zero).empty());
  const std::vector<CropBox> big = pan_and_scan_boxes(1 << 30, 300);
  ASSERT_EQ(big.size(), 4u);
  EXPECT_EQ(int64_t{big[3].x} + big[3].width, int64_t{1} << 30);
}

// ---- bad images ---------------------------------------------------------------------------

std::string message_of(const Result<Image>& r) { return r.ok() ? std::string("(ok)") : r.status().message(); }

std::vector<uint8_t> png_header_only(uint32_t w, uint32_t h) {
  std::vector<uint8_t> b = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  for (uint32_t v : {w, h})
    for (int s = 24; s >= 0; s -= 8) b.push_back(uint8_t(v >> s));
  for (uint8_t v : {8, 2, 0, 0, 0, 0, 0, 0, 0}) b.push_back(v);  // 8-bit RGB, then a CRC stb ignores
  return b;
}

TEST(ImageLimits, OversizeHeaderNamesTheLimit) {
  Result<Image> r = decode_image(png_header_only(20000, 10), "big.png");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kOutOfRange);
  EXPECT_NE(message_of(r).find("20000x10"), std::string::npos) << message_of(r);
  EXPECT_NE(message_of(r).find("ImageLimits::max_side"), std::string::npos) << message_of(r);
  EXPECT_NE(message_of(r).find("big.png"), std::string::npos) << message_of(r);

  r = decode_image(png_header_only(16000, 16000), "big.png");  // 256M pixels > 64M
  EXPECT_NE(message_of(r).find("ImageLimits::max_pixels"), std::string::npos) << message_of(r);

  const std::string path = kImages + "rgb_300x90.png";
  ImageLimits small;
  small.max_side = 200;
  EXPECT_NE(message_of(load_image(path, small)).find("max_side"), std::string::npos);
  small = {};
  small.max_pixels = 1000;
  EXPECT_NE(message_of(load_image(path, small)).find("300x90 = 27000 pixels"), std::string::npos);
  small = {};
  small.max_file_bytes = 100;
  r = load_image(path, small);
  EXPECT_EQ(r.status().code(), ErrorCode::kOutOfRange);
  EXPECT_NE(message_of(r).find("ImageLimits::max_file_bytes"), std::string::npos) << message_of(r);
  EXPECT_NE(message_of(decode_image(read_bytes(path), "<memory>", small)).find("max_file_bytes"),
            std::string::npos);
}

TEST(ImageLimits, TruncatedFiles) {
  for (const char* name : {"rgb_300x90.png", "rgb_37x23.bmp", "photo_96x64.jpg", "anim_40x30.gif"}) {
    SCOPED_TRACE(name);
    const std::string file = name;
    const std::vector<uint8_t> full = read_bytes(kImages + file);
    ASSERT_GT(full.size(), 100u);
    for (size_t keep :
         {size_t{4}, size_t{12}, size_t{30}, full.size() / 2, full.size() - 13, full.size() - 1}) {
      SCOPED_TRACE(keep);
      const std::vector<uint8_t> cut(full.begin(), full.begin() + keep);
      Result<Image> r = decode_image(cut, file);
      if (r.ok()) {
        // stb pads a cut JPEG or GIF stream (libjpeg does too, with a warning), and a PNG that
        // lacks only IEND's CRC is whole; such an image must still be complete.
        EXPECT_EQ(r->rgb.size(), size_t(r->width) * r->height * 3);
        EXPECT_TRUE(file.ends_with(".jpg") || file.ends_with(".gif") || keep == full.size() - 1);
      } else {
        EXPECT_NE(r.status().message().find(file + ": "), std::string::npos) << r.status().message();
      }
    }
  }
  // A PNG cut in its IDAT stream: stb's reason in the message.
  const std::vector<uint8_t> png = read_bytes(kImages + "rgb_300x90.png");
  Result<Image> r = decode_image(std::vector<uint8_t>(png.begin(), png.begin() + png.size() / 2), "t.png");
  EXPECT_NE(message_of(r).find("cannot decode PNG image (300x90): "), std::string::npos) << message_of(r);
  // A BMP whose pixel rows are cut: checked against the header before stb pads it with zeros.
  const std::vector<uint8_t> bmp = read_bytes(kImages + "rgb_37x23.bmp");
  r = decode_image(std::vector<uint8_t>(bmp.begin(), bmp.end() - 1), "t.bmp");
  EXPECT_NE(message_of(r).find("truncated BMP"), std::string::npos) << message_of(r);
  r = decode_image(std::vector<uint8_t>{0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0}, "t.png");
  EXPECT_NE(message_of(r).find("corrupt or truncated PNG header"), std::string::npos) << message_of(r);
}

TEST(ImageLimits, CorruptBytes) {
  std::vector<uint8_t> png = read_bytes(kImages + "rgb_300x90.png");
  ASSERT_GT(png.size(), 200u);
  for (size_t i = 100; i < 200; ++i) png[i] ^= 0x5a;  // inside the IDAT stream
  Result<Image> r = decode_image(png, "bad.png");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  EXPECT_NE(message_of(r).find("cannot decode PNG image (300x90): "), std::string::npos) << message_of(r);

  // Every single-byte corruption of a small image: an error or a whole image, never a crash.
  const std::vector<uint8_t> gif = read_bytes(kImages + "pal_trns_33x17.png");
  for (size_t i = 0; i < gif.size(); ++i) {
    std::vector<uint8_t> b = gif;
    b[i] ^= 0xff;
    Result<Image> d = decode_image(b, "x");
    if (d.ok()) EXPECT_EQ(d->rgb.size(), size_t(d->width) * d->height * 3);
  }
}

TEST(ImageLimits, EmptyNonImageUnsupportedMissing) {
  Result<Image> r = decode_image({}, "e.png");
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  EXPECT_NE(message_of(r).find("empty file"), std::string::npos) << message_of(r);

  const std::string html = "<html>not an image</html>";
  r = decode_image(std::vector<uint8_t>(html.begin(), html.end()), "page.png");
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  EXPECT_NE(message_of(r).find("not a PNG, JPEG, BMP or GIF image (first bytes: 3c 68 74 6d"),
            std::string::npos)
      << message_of(r);

  const std::string webp("RIFF\x10\0\0\0WEBPVP8 ", 16);
  r = decode_image(std::vector<uint8_t>(webp.begin(), webp.end()), "a.webp");
  EXPECT_EQ(r.status().code(), ErrorCode::kUnsupported);
  EXPECT_NE(message_of(r).find("unsupported image format WebP (supported: PNG, JPEG, BMP, GIF)"),
            std::string::npos)
      << message_of(r);
  const std::string tiff("II*\0\x08\0\0\0", 8);
  EXPECT_NE(message_of(decode_image(std::vector<uint8_t>(tiff.begin(), tiff.end()), "a.tif")).find("TIFF"),
            std::string::npos);

  r = load_image(kImages + "no_such_image.png");
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_NE(message_of(r).find("no_such_image.png: image file not found"), std::string::npos)
      << message_of(r);
  r = load_image(kImages);  // a directory
  EXPECT_FALSE(r.ok());
}

// fuzz_image finding 1 (fuzz/corpus/image/crash-jpeg-dht-*): a JPEG DHT segment
// whose 16 code counts add up to 259 made stb_image 2.27 write past its Huffman size table
// (UBSan index 257 out of bounds in stbi__build_huffman). Refused before stb runs now.
TEST(ImageRegressions, JpegHuffmanTableWithMoreThan256Codes) {
  // The second input has the bad table before SOF, where stbi_info_from_memory read it.
  for (const char* crash : {"crash-jpeg-dht-over-256-codes", "crash-jpeg-dht-before-sof"}) {
    SCOPED_TRACE(crash);
    const std::vector<uint8_t> b = read_bytes(std::string(GEMMA3_SOURCE_DIR) + "/fuzz/corpus/image/" + crash);
    ASSERT_FALSE(b.empty());
    Result<Image> r = decode_image(b, "crash.jpg");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
    EXPECT_NE(message_of(r).find("codes (at most 256)"), std::string::npos) << message_of(r);
  }
  // The same table inside an APP1 payload (say an EXIF blob) is not a DHT stb reads: accepted.
  std::vector<uint8_t> jpg = read_bytes(kImages + "photo_96x64.jpg");
  std::vector<uint8_t> app = {0xff, 0xe1, 0, 2 + 21, 0xff, 0xc4, 0, 19, 0x00};  // APP1 of 21 bytes
  for (int k = 0; k < 16; ++k) app.push_back(k < 2 ? 255 : 0);
  jpg.insert(jpg.begin() + 2, app.begin(), app.end());
  Result<Image> r = decode_image(jpg, "exif.jpg");
  EXPECT_TRUE(r.ok()) << message_of(r);
}

// fuzz_image finding 2 (fuzz/corpus/image/crash-jpeg-undefined-huffman-table): a progressive
// scan selecting a Huffman table that no DHT defined made stb 2.27 read its uninitialized
// (malloc'ed) table: UBSan "index -31 out of bounds" in stbi__jpeg_huff_decode, depending on
// what the heap held. stb's allocations are zeroed now, so the input fails the same way always.
TEST(ImageRegressions, JpegScanWithUndefinedHuffmanTable) {
  const std::vector<uint8_t> b =
      read_bytes(std::string(GEMMA3_SOURCE_DIR) + "/fuzz/corpus/image/crash-jpeg-undefined-huffman-table");
  ASSERT_FALSE(b.empty());
  for (int i = 0; i < 3; ++i) {  // and after other decodes left data on the heap
    Result<Image> r = decode_image(b, "crash.jpg");
    ASSERT_FALSE(r.ok());
    EXPECT_NE(message_of(r).find("cannot decode JPEG image (16x16): bad huffman code"), std::string::npos)
        << message_of(r);
    ASSERT_TRUE(load_image(kImages + "photo_96x64.jpg").ok());
  }
}

// fuzz_image finding 4 (fuzz/corpus/image/crash-png-empty-first-idat): a zero-length first IDAT
// chunk made stb 2.27 memcpy into its null buffer (UBSan in stbi__getn; the fuzz stage replays
// the input under UBSan). Empty IDAT chunks are dropped before stb runs: a valid PNG with one
// inserted before its data decodes to the same pixels, and the fuzzer's input is a clean error.
TEST(ImageRegressions, PngWithEmptyIdatChunks) {
  const std::vector<uint8_t> png = read_bytes(kImages + "rgb_300x90.png");
  ASSERT_GT(png.size(), 33u);
  std::vector<uint8_t> with_empty(png.begin(), png.begin() + 33);  // signature + IHDR
  const uint8_t empty_idat[12] = {0, 0, 0, 0, 'I', 'D', 'A', 'T', 0x35, 0xAF, 0x06, 0x1E};  // crc32("IDAT")
  with_empty.insert(with_empty.end(), empty_idat, empty_idat + 12);
  with_empty.insert(with_empty.end(), png.begin() + 33, png.end());
  Result<Image> want = decode_image(png, "a.png"), got = decode_image(with_empty, "b.png");
  ASSERT_TRUE(want.ok() && got.ok()) << message_of(got);
  EXPECT_EQ(got->width, want->width);
  EXPECT_EQ(got->rgb, want->rgb);

  // The second input's empty IDAT has its CRC cut off by the end of the file: stb copies it all
  // the same (it checks the CRC after the data).
  for (const char* name : {"crash-png-empty-first-idat", "crash-png-empty-idat-without-crc"}) {
    const std::vector<uint8_t> crash =
        read_bytes(std::string(GEMMA3_SOURCE_DIR) + "/fuzz/corpus/image/" + name);
    ASSERT_FALSE(crash.empty()) << name;
    Result<Image> r = decode_image(crash, "crash.png");
    EXPECT_FALSE(r.ok()) << name;
  }
}

// A PNG whose header says 1x1 but whose IDAT inflates to ~100 MB: the allocation budget stops
// the inflater (stb would otherwise grow its buffer to the stream's end).
TEST(ImageLimits, ZlibBombStopsAtTheBudget) {
  // Fixed-Huffman deflate: one literal 0, then (length 258, distance 1) repeated; 13 bits per
  // 258 output bytes. Bits go LSB first; Huffman codes MSB first.
  std::vector<uint8_t> z = {0x78, 0x01};
  uint32_t acc = 0;
  int nbits = 0;
  auto put = [&](uint32_t v, int n, bool huffman) {
    for (int i = 0; i < n; ++i) {
      const uint32_t bit = huffman ? (v >> (n - 1 - i)) & 1 : (v >> i) & 1;
      acc |= bit << nbits;
      if (++nbits == 8) z.push_back(uint8_t(acc)), acc = 0, nbits = 0;
    }
  };
  put(1, 1, false);    // BFINAL
  put(1, 2, false);    // BTYPE = fixed Huffman
  put(0x30, 8, true);  // literal 0
  for (int i = 0; i < 400000; ++i) {
    put(0xc5, 8, true);  // symbol 285: length 258
    put(0, 5, true);     // distance code 0: distance 1
  }
  put(0, 7, true);  // end of block
  put(0, 8 - nbits, false);
  for (int i = 0; i < 4; ++i) z.push_back(0);  // adler32 (stb does not check it)
  std::vector<uint8_t> png = png_header_only(1, 1);
  for (int s = 24; s >= 0; s -= 8) png.push_back(uint8_t(z.size() >> s));
  for (char c : std::string("IDAT")) png.push_back(uint8_t(c));
  png.insert(png.end(), z.begin(), z.end());
  for (int i = 0; i < 4; ++i) png.push_back(0);  // IDAT's CRC (not checked)
  for (char c : std::string("\0\0\0\0IEND\0\0\0\0", 12)) png.push_back(uint8_t(c));
  Result<Image> r = decode_image(png, "bomb.png");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kOutOfMemory) << message_of(r);
  EXPECT_NE(message_of(r).find("decompression bomb"), std::string::npos) << message_of(r);
}

}  // namespace
}  // namespace gemma3::vision
