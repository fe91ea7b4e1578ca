// Image input (src/image/image.h) against Pillow and transformers' Gemma3ImageProcessorPil:
// tests/data/goldens/images.json, written by tools/reference/make_image_goldens.py from the
// committed images in tests/data/images/. Also the limits and every class of bad image.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "image/image.h"

namespace gemma3::vision {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kImages = std::string(GEMMA3_SOURCE_DIR) + "/tests/data/images/";
const std::string kCorpus = std::string(GEMMA3_SOURCE_DIR) + "/fuzz/corpus/image/";

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
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
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
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  EXPECT_NE(message_of(r).find("ImageLimits::max_file_bytes"), std::string::npos) << message_of(r);
  EXPECT_NE(message_of(decode_image(read_bytes(path), "<memory>", small)).find("max_file_bytes"),
            std::string::npos);
}

// Headers declaring w x h, nothing after: JPEG SOI + SOF0 (3 components), a 24-bit BMP with a
// 40-byte info header (negative h: rows top to bottom), a GIF89a logical screen.
std::vector<uint8_t> jpeg_header_only(uint32_t w, uint32_t h) {
  std::vector<uint8_t> b = {0xff, 0xd8, 0xff, 0xc0, 0, 17, 8};
  for (uint32_t v : {h, w}) b.push_back(uint8_t(v >> 8)), b.push_back(uint8_t(v));
  for (uint8_t v : {3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1}) b.push_back(v);
  return b;
}

std::vector<uint8_t> le_bytes(std::vector<uint8_t> b, std::initializer_list<std::pair<int64_t, int>> fields) {
  for (const auto& [v, n] : fields)
    for (int i = 0; i < n; ++i) b.push_back(i < 8 ? uint8_t(uint64_t(v) >> (8 * i)) : 0);
  return b;
}

std::vector<uint8_t> bmp_header_only(int32_t w, int32_t h) {
  return le_bytes({'B', 'M'}, {{54, 4}, {0, 4}, {54, 4}, {40, 4}, {w, 4}, {h, 4}, {1, 2}, {24, 2}, {0, 24}});
}

std::vector<uint8_t> gif_header_only(uint16_t w, uint16_t h) {
  return le_bytes({'G', 'I', 'F', '8', '9', 'a'}, {{w, 2}, {h, 2}, {0, 3}});
}

// Issue #12 item 11: a PNG header declaring 65535x65535 was reported as "corrupt or truncated
// PNG header (too large)": stb's header reader refuses more than 2^30 bytes of pixels before our
// limits were checked. The size is now read from each format's header first, and every limit is
// a bad-input error (kInvalidFile: the CLI's exit 3) that names the limit.
TEST(ImageLimits, HeaderSizeOverTheLimitInEveryFormat) {
  struct Case {
    const char* format;
    std::vector<uint8_t> bytes;
    const char* size;
    const char* limit;
  };
  const std::vector<Case> cases = {
      {"PNG", png_header_only(65535, 65535), "65535x65535", "max_side"},
      {"PNG", png_header_only(10, 0x7fffffff), "10x2147483647", "max_side"},
      {"PNG", png_header_only(0xffffffff, 1), "4294967295x1", "max_side"},
      {"PNG", png_header_only(16000, 16000), "16000x16000 = 256000000", "max_pixels"},
      {"JPEG", jpeg_header_only(65535, 65535), "65535x65535", "max_side"},
      {"JPEG", jpeg_header_only(16000, 16000), "16000x16000 = 256000000", "max_pixels"},
      {"BMP", bmp_header_only(20000, 10), "20000x10", "max_side"},
      {"BMP", bmp_header_only(7, -20000), "7x20000", "max_side"},  // top-down
      {"BMP", bmp_header_only(16000, -16000), "16000x16000 = 256000000", "max_pixels"},
      {"GIF", gif_header_only(65535, 65535), "65535x65535", "max_side"},
      {"GIF", gif_header_only(16000, 16000), "16000x16000 = 256000000", "max_pixels"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.format) + " " + c.size);
    Result<Image> r = decode_image(c.bytes, "big.img");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
    const std::string want = std::string("big.img: ") + c.format + " image is " + c.size;
    EXPECT_NE(message_of(r).find(want), std::string::npos) << message_of(r);
    EXPECT_NE(message_of(r).find(std::string("(ImageLimits::") + c.limit + ")"), std::string::npos)
        << message_of(r);
  }
  // Within the limits, the same headers are short files: stb's own reason, not a limit.
  Result<Image> r = decode_image(png_header_only(300, 200), "short.png");
  EXPECT_EQ(message_of(r).find("ImageLimits"), std::string::npos) << message_of(r);
  r = decode_image(gif_header_only(0, 5), "empty.gif");
  EXPECT_NE(message_of(r).find("GIF image has size 0x5, expected at least 1x1"), std::string::npos)
      << message_of(r);
}

// Issue #12 item 11: an image file over 64 MiB is bad input (kInvalidFile, the CLI's exit 3),
// checked from the file's size before it is read (a sparse file here: no 64 MiB written).
TEST(ImageLimits, FileOverTheSizeLimitIsBadInput) {
  const fs::path path = fs::path(testing::TempDir()) / "gemma3_image_64mib_plus_1.png";
  {
    std::ofstream f(path, std::ios::binary);
    f.write("\x89PNG\r\n\x1a\n", 8);
  }
  fs::resize_file(path, (uint64_t{64} << 20) + 1);
  Result<Image> r = load_image(path.string());
  fs::remove(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  EXPECT_NE(
      message_of(r).find(path.string() + ": image file is 67108865 bytes, over the limit of 67108864 bytes "
                                         "(ImageLimits::max_file_bytes)"),
      std::string::npos)
      << message_of(r);
  // The same check for callers that read the file themselves (the session's image cache).
  EXPECT_TRUE(check_image_file_size(uint64_t{64} << 20, "x.png").ok());
  const Status st = check_image_file_size((uint64_t{64} << 20) + 1, "x.png");
  EXPECT_EQ(st.code(), ErrorCode::kInvalidFile);
  EXPECT_EQ(st.message(),
            "x.png: image file is 67108865 bytes, over the limit of 67108864 bytes "
            "(ImageLimits::max_file_bytes)");
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
    if (d.ok()) {
      EXPECT_EQ(d->rgb.size(), size_t(d->width) * d->height * 3);
    }
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

// Issue #12 item 5: stb_image 2.27 looks a palette index up unchecked in a 256-entry table that
// holds only the entries the file gave. For PNG and BMP the rest of that table is uninitialized
// stack: an 8x8 palette PNG whose indices point past its 4-entry PLTE decoded to different
// pixels from run to run (and so different greedy text). GIF's tables are zeroed (such an index
// was transparent, so white). The decoder now pads every palette with black first, which is what
// Pillow 13 shows (its palette is zero past the file's entries): the expected pixels below are
// Pillow's (Image.open + transformers' convert_to_rgb) for these files in fuzz/corpus/image.
// Decoded twice with another image in between; scripts/memcheck.sh runs this under valgrind.
TEST(ImageRegressions, PaletteIndexPastThePaletteIsBlackAsInPillow) {
  using Rgb = std::array<uint8_t, 3>;
  struct Case {
    const char* file;
    int width, height;
    std::vector<Rgb> palette;            // the entries the file gives
    std::function<int(int, int)> index;  // the pixel's palette index at (x, y)
  };
  const std::vector<Rgb> four = {Rgb{255, 0, 0}, Rgb{0, 255, 0}, Rgb{0, 0, 255}, Rgb{255, 255, 0}};
  auto row_major = [](int x, int y) { return y * 8 + x; };
  std::vector<Rgb> os2(256);  // a full 256-entry OS/2 palette, of which stb read only 252
  for (int i = 0; i < 256; ++i) os2[i] = Rgb{uint8_t(i), uint8_t(255 - i), uint8_t(i * 7)};
  const std::vector<Case> cases = {
      {"pal_oob_8x8.png", 8, 8, four, row_major},  // the input: 8-bit, indices 0..63
      {"pal1_oob_8x2.png", 8, 2, {Rgb{10, 20, 30}}, [](int x, int) { return x & 1; }},  // 1-bit
      {"pal8_oob_8x8.bmp", 8, 8, four, row_major},
      {"pal4_oob_8x4.bmp", 8, 4, {four[0], four[1]}, [](int x, int y) { return (x + y) % 16; }},
      {"pal1_oob_8x2.bmp", 8, 2, {four[0]}, [](int x, int) { return x & 1; }},
      {"os2_pal8_4x2.bmp", 4, 2, os2,
       [](int x, int y) { return std::array<int, 8>{0, 100, 252, 253, 254, 255, 1, 2}[y * 4 + x]; }},
      {"gct_oob_8x8.gif", 8, 8, {four[0], four[1]}, row_major},
      {"lct_oob_8x8.gif", 8, 8, {Rgb{0, 0, 255}, Rgb{9, 9, 9}}, row_major},  // the local table wins
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.file);
    const std::vector<uint8_t> bytes = read_bytes(kCorpus + c.file);
    ASSERT_FALSE(bytes.empty());
    Result<Image> first = decode_image(bytes, c.file);
    ASSERT_TRUE(first.ok()) << message_of(first);
    ASSERT_TRUE(load_image(kImages + "rgb_300x90.png").ok());  // other data on the stack and heap
    Result<Image> second = decode_image(bytes, c.file);
    ASSERT_TRUE(second.ok()) << message_of(second);
    EXPECT_EQ(first->rgb, second->rgb);
    ASSERT_EQ(first->width, c.width);
    ASSERT_EQ(first->height, c.height);
    for (int y = 0; y < c.height; ++y) {
      for (int x = 0; x < c.width; ++x) {
        const size_t i = size_t(c.index(x, y));
        const Rgb want = i < c.palette.size() ? c.palette[i] : Rgb{0, 0, 0};
        const uint8_t* got = first->rgb.data() + (size_t(y) * c.width + x) * 3;
        EXPECT_EQ((Rgb{got[0], got[1], got[2]}), want) << "pixel " << x << "," << y << " index " << i;
      }
    }
  }

  // A tRNS chunk longer than PLTE (stb refused it: "bad tRNS len"): its alphas apply to the
  // black entries past the palette, as in Pillow. tRNS = 0, 128, 255, 60, 10, 200, 30, 77.
  Result<Image> r = decode_image(read_bytes(kCorpus + "pal_oob_trns_8x8.png"), "trns.png");
  ASSERT_TRUE(r.ok()) << message_of(r);
  const std::vector<uint8_t> pillow_first8 = {255, 255, 255, 127, 255, 127, 0,   0,   255, 255, 255, 195,
                                              245, 245, 245, 55,  55,  55,  225, 225, 225, 178, 178, 178};
  EXPECT_EQ(std::vector<uint8_t>(r->rgb.begin(), r->rgb.begin() + 24), pillow_first8);
  EXPECT_TRUE(std::all_of(r->rgb.begin() + 24, r->rgb.end(), [](uint8_t v) { return v == 0; }));

  // A BMP whose pixel data offset points inside its header: stb's palette count went negative and
  // no entry was read at all. A clear error now (Pillow reads pixels from inside the header).
  r = decode_image(read_bytes(kCorpus + "offset_in_header_4x2.bmp"), "t.bmp");
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
  EXPECT_NE(
      message_of(r).find("t.bmp: corrupt BMP: its pixel data offset 50 points inside its 54-byte header"),
      std::string::npos)
      << message_of(r);
}

// A GIF cut before its first image's pixels decoded to a blank image (stb reads past the end as
// zeros), and a GIF with no image failed "for no reason". Each cut of a valid GIF up to its
// first pixel byte is now an error naming where the file ends; a cut inside the pixel data
// still decodes (padded, like a cut JPEG).
TEST(ImageRegressions, GifCutBeforeItsPixelsIsTruncated) {
  const std::vector<uint8_t> gif = read_bytes(kImages + "anim_40x30.gif");
  ASSERT_GT(gif.size(), 100u);
  // The first pixel byte: past the header, the tables, the extensions and the descriptor.
  size_t at = 13 + ((gif[10] & 0x80) ? size_t{3} << ((gif[10] & 7) + 1) : 0);
  while (gif[at] == 0x21) {
    at += 2;
    while (gif[at] != 0) at += 1 + gif[at];
    ++at;
  }
  ASSERT_EQ(gif[at], 0x2c);
  const size_t first_pixel = at + 10 + ((gif[at + 9] & 0x80) ? size_t{3} << ((gif[at + 9] & 7) + 1) : 0) + 1;
  for (size_t keep = 6; keep <= first_pixel; ++keep) {
    Result<Image> r = decode_image(std::vector<uint8_t>(gif.begin(), gif.begin() + keep), "cut.gif");
    ASSERT_FALSE(r.ok()) << "kept " << keep << " of " << gif.size();
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidFile);
    EXPECT_NE(message_of(r).find("cut.gif: "), std::string::npos) << message_of(r);
    if (keep >= 13) EXPECT_NE(message_of(r).find("truncated GIF"), std::string::npos) << message_of(r);
  }
  Result<Image> r = decode_image(std::vector<uint8_t>(gif.begin(), gif.begin() + first_pixel + 8), "cut.gif");
  EXPECT_TRUE(r.ok()) << message_of(r);
  // Header, global table, trailer: no image.
  std::vector<uint8_t> empty(gif.begin(),
                             gif.begin() + 13 + ((gif[10] & 0x80) ? size_t{3} << ((gif[10] & 7) + 1) : 0));
  empty.push_back(0x3b);
  r = decode_image(empty, "none.gif");
  EXPECT_NE(message_of(r).find("none.gif: GIF without an image"), std::string::npos) << message_of(r);
}

// A run-length encoded BMP is valid but stb cannot read it: "unsupported", naming the
// compression, rather than stb's "unknown image type" (which read as a corrupt file).
TEST(ImageRegressions, RleBmpIsUnsupportedByName) {
  std::vector<uint8_t> bmp = read_bytes(kImages + "rgb_37x23.bmp");
  ASSERT_GT(bmp.size(), 54u);
  for (auto [code, name] : {std::pair{1, "RLE8"}, {2, "RLE4"}, {4, "JPEG"}, {5, "PNG"}}) {
    bmp[30] = static_cast<uint8_t>(code);
    Result<Image> r = decode_image(bmp, "rle.bmp");
    EXPECT_EQ(r.status().code(), ErrorCode::kUnsupported) << message_of(r);
    EXPECT_NE(message_of(r).find(std::string("rle.bmp: BMP with ") + name + " compression is not supported"),
              std::string::npos)
        << message_of(r);
  }
}

// The same BMP stored top-down: height negated, rows in the other order.
std::vector<uint8_t> bmp_top_down(std::vector<uint8_t> b) {
  auto le = [&](size_t at, int n) {
    uint32_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = v << 8 | b[at + i];
    return v;
  };
  const uint32_t offset = le(10, 4), bpp = le(28, 2);
  const int32_t w = int32_t(le(18, 4)), h = int32_t(le(22, 4));
  const size_t stride = (size_t(w) * bpp + 31) / 32 * 4;
  const std::vector<uint8_t> rows(b.begin() + offset, b.begin() + offset + stride * h);
  for (int32_t y = 0; y < h; ++y)
    std::copy_n(rows.begin() + stride * (h - 1 - y), stride, b.begin() + offset + stride * y);
  for (int i = 0; i < 4; ++i) b[22 + i] = uint8_t(uint32_t(-h) >> (8 * i));
  return b;
}

// Issue #12 item 6: a valid top-down BMP (negative height) was refused with "BMP image has size
// 7x-5": stb's header reader returns the height as stored. Each BMP here decodes to the same
// pixels as its top-down copy (24-bit, 32-bit with alpha, 8-bit palette).
TEST(ImageRegressions, TopDownBmpEqualsBottomUp) {
  for (const std::string& path : {kImages + "rgb_37x23.bmp", kCorpus + "rgb_5x3.bmp",
                                  kCorpus + "rgba_4x2.bmp", kCorpus + "pal_7x3.bmp"}) {
    SCOPED_TRACE(path);
    const std::vector<uint8_t> bottom_up = read_bytes(path);
    ASSERT_GT(bottom_up.size(), 54u);
    Result<Image> want = decode_image(bottom_up, "up.bmp"),
                  got = decode_image(bmp_top_down(bottom_up), "down.bmp");
    ASSERT_TRUE(want.ok()) << message_of(want);
    ASSERT_TRUE(got.ok()) << message_of(got);
    EXPECT_EQ(got->width, want->width);
    EXPECT_EQ(got->height, want->height);
    EXPECT_EQ(got->rgb, want->rgb);
  }
  // The size, written top-down directly: pixel (x, y) = (30x, 40y, 200), as Pillow reads it.
  Result<Image> r = decode_image(read_bytes(kCorpus + "topdown_7x5.bmp"), "topdown.bmp");
  ASSERT_TRUE(r.ok()) << message_of(r);
  ASSERT_EQ(r->width, 7);
  ASSERT_EQ(r->height, 5);
  for (int y = 0; y < 5; ++y) {
    for (int x = 0; x < 7; ++x) {
      const uint8_t* p = r->rgb.data() + (y * 7 + x) * 3;
      EXPECT_EQ((std::array<uint8_t, 3>{p[0], p[1], p[2]}),
                (std::array<uint8_t, 3>{uint8_t(30 * x), uint8_t(40 * y), 200}))
          << x << "," << y;
    }
  }
}

// Every input in fuzz/corpus/image (seeds and past crashes) through decode_image twice, with the
// fuzz target's limits: the same outcome both times (the same pixels, or the same error). Cheap
// natively; scripts/memcheck.sh runs it under valgrind, which reports what a comparison can miss
// and ASan never sees: a read of uninitialized memory.
TEST(ImageRegressions, FuzzCorpusDecodesTheSameTwice) {
  ImageLimits limits;  // fuzz/fuzz_image.cpp's
  limits.max_file_bytes = 1 << 20;
  limits.max_pixels = 1 << 20;
  limits.max_side = 4096;
  size_t n = 0;
  for (const fs::directory_entry& e : fs::directory_iterator(kCorpus)) {
    if (!e.is_regular_file()) continue;
    SCOPED_TRACE(e.path().filename().string());
    const std::vector<uint8_t> bytes = read_bytes(e.path().string());
    Result<Image> a = decode_image(bytes, "corpus", limits), b = decode_image(bytes, "corpus", limits);
    ASSERT_EQ(a.ok(), b.ok());
    if (a.ok()) {
      EXPECT_EQ(a->width, b->width);
      EXPECT_EQ(a->rgb, b->rgb);
      EXPECT_EQ(a->rgb.size(), size_t(a->width) * a->height * 3);
    } else {
      EXPECT_EQ(a.status().message(), b.status().message());
    }
    ++n;
  }
  EXPECT_GE(n, 20u);
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
