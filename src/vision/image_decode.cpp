// decode_image / load_image: stb_image behind a format sniff, header limits and an allocation
// budget (image.h).
//
// Only the PNG, JPEG, BMP and GIF decoders of stb_image are compiled in (STBI_ONLY_*): stb's
// TGA reader has no magic number and would "decode" arbitrary bytes, and PSD/HDR/PIC/PNM are not
// formats a chat user sends. Formats Pillow reads but we do not (WebP, TIFF, ...) are named in
// an "unsupported image format" error.
//
// Colour conversion follows the reference processor, not bare PIL: transformers'
// convert_to_rgb composites any image with alpha (or a transparency key: palette/gray/RGB
// tRNS, GIF transparent index) onto white with PIL.Image.alpha_composite, then drops alpha.
// stb gives RGBA with the transparency key already applied, so we composite with Pillow's
// integer formula (libImaging/AlphaComposite.c) and match it bit for bit.
//
// One deliberate difference: a 16-bit grayscale PNG opens in Pillow as mode "I;16", whose
// conversion to RGB clips each value to 255 (a mostly white image); stb keeps the high byte, as
// Pillow itself does for 16-bit RGB/RGBA PNGs. We keep stb's, the image the user sees.
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string_view>

#include "vision/image.h"

namespace gemma3::vision {
namespace {

// ---- allocation budget -------------------------------------------------------------------
// stb sizes its output from the header, which the limits check, but its zlib inflater grows its
// buffer as long as the compressed stream goes on: a PNG with a 1x1 header and a 60 MB IDAT of
// zeros would inflate to gigabytes. Every stb allocation goes through this per-thread budget;
// over it, stb gets nullptr and fails with "outofmem".
struct Budget {
  size_t limit = 0;
  size_t used = 0;
  bool exceeded = false;
};
thread_local Budget* t_budget = nullptr;

constexpr size_t kHeader = 16;  // size prefix; keeps the 16-byte alignment malloc gives

bool budget_take(size_t n) {
  Budget* b = t_budget;
  if (b == nullptr) return true;
  if (n > b->limit - b->used) {
    b->exceeded = true;
    return false;
  }
  b->used += n;
  return true;
}

void budget_give(size_t n) {
  if (t_budget != nullptr) t_budget->used -= std::min(n, t_budget->used);
}

void* stb_malloc(size_t n) {
  if (n > std::numeric_limits<size_t>::max() - kHeader || !budget_take(n)) return nullptr;
  // Zeroed (calloc): stb 2.27 mallocs its JPEG decoder state and reads a Huffman table a scan
  // selects even when no DHT defined it. Zeroed, such a table decodes every code as symbol 0
  // through its fast lookup (a garbage image, no out-of-bounds index); uninitialized, its
  // garbage deltas index out of bounds (fuzz_image finding 2).
  auto* p = static_cast<unsigned char*>(std::calloc(1, n + kHeader));
  if (p == nullptr) {
    budget_give(n);
    return nullptr;
  }
  std::memcpy(p, &n, sizeof n);
  return p + kHeader;
}

void stb_free(void* q) {
  if (q == nullptr) return;
  unsigned char* p = static_cast<unsigned char*>(q) - kHeader;
  size_t n;
  std::memcpy(&n, p, sizeof n);
  budget_give(n);
  std::free(p);
}

void* stb_realloc(void* q, size_t n) {
  if (q == nullptr) return stb_malloc(n);
  unsigned char* p = static_cast<unsigned char*>(q) - kHeader;
  size_t old;
  std::memcpy(&old, p, sizeof old);
  if (n > std::numeric_limits<size_t>::max() - kHeader) return nullptr;
  if (n > old && !budget_take(n - old)) return nullptr;
  auto* r = static_cast<unsigned char*>(std::realloc(p, n + kHeader));
  if (r == nullptr) {
    if (n > old) budget_give(n - old);
    return nullptr;  // q stays valid, as realloc promises
  }
  if (n < old) budget_give(old - n);
  std::memcpy(r, &n, sizeof n);
  return r + kHeader;
}

}  // namespace
}  // namespace gemma3::vision

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC  // private copy: no clash with another stb_image in the process
#define STBI_NO_STDIO     // we read files ourselves (size checked first)
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STBI_ONLY_GIF
// A compile-time backstop; the real limits are ImageLimits, checked from the header first.
#define STBI_MAX_DIMENSIONS (1 << 20)
#define STBI_MALLOC(sz) ::gemma3::vision::stb_malloc(sz)
#define STBI_REALLOC(p, newsz) ::gemma3::vision::stb_realloc(p, newsz)
#define STBI_FREE(p) ::gemma3::vision::stb_free(p)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#include <stb_image.h>
#pragma GCC diagnostic pop

namespace gemma3::vision {
namespace {

constexpr const char* kSupported = "supported: PNG, JPEG, BMP, GIF";

enum class Format { kPng, kJpeg, kBmp, kGif };

const char* format_name(Format f) {
  switch (f) {
    case Format::kPng: return "PNG";
    case Format::kJpeg: return "JPEG";
    case Format::kBmp: return "BMP";
    case Format::kGif: return "GIF";
  }
  return "?";
}

bool starts_with(std::span<const uint8_t> b, std::string_view magic, size_t at = 0) {
  if (b.size() < at + magic.size()) return false;
  return std::memcmp(b.data() + at, magic.data(), magic.size()) == 0;
}

// The format we decode, from the magic bytes; nullopt-like false when none matches.
bool sniff_supported(std::span<const uint8_t> b, Format* out) {
  using namespace std::string_view_literals;
  if (starts_with(b, "\x89PNG\r\n\x1a\n"sv))
    *out = Format::kPng;
  else if (starts_with(b, "\xff\xd8\xff"sv))
    *out = Format::kJpeg;
  else if (starts_with(b, "BM"sv))
    *out = Format::kBmp;
  else if (starts_with(b, "GIF87a"sv) || starts_with(b, "GIF89a"sv))
    *out = Format::kGif;
  else
    return false;
  return true;
}

// Formats Pillow (or a browser) reads that we do not: named so the user knows to convert.
const char* sniff_unsupported(std::span<const uint8_t> b) {
  using namespace std::string_view_literals;
  if (starts_with(b, "RIFF"sv) && starts_with(b, "WEBP"sv, 8)) return "WebP";
  if (starts_with(b, "II*\0"sv) || starts_with(b, "MM\0*"sv)) return "TIFF";
  if (starts_with(b, "ftypavif"sv, 4) || starts_with(b, "ftypavis"sv, 4)) return "AVIF";
  if (starts_with(b, "ftyphei"sv, 4) || starts_with(b, "ftypheix"sv, 4) || starts_with(b, "ftypmif1"sv, 4))
    return "HEIF";
  if (starts_with(b, "\0\0\0\x0cjP  "sv) || starts_with(b, "\xff\x4f\xff\x51"sv)) return "JPEG 2000";
  if (starts_with(b, "\xff\x0a"sv) || starts_with(b, "\0\0\0\x0cJXL "sv)) return "JPEG XL";
  if (starts_with(b, "\0\0\1\0"sv)) return "ICO";
  if (starts_with(b, "8BPS"sv)) return "PSD";
  if (starts_with(b, "qoif"sv)) return "QOI";
  if (starts_with(b, "DDS "sv)) return "DDS";
  if (starts_with(b, "icns"sv)) return "ICNS";
  if (starts_with(b, "#?RADIANCE"sv) || starts_with(b, "#?RGBE"sv)) return "Radiance HDR";
  if (starts_with(b, "\x76\x2f\x31\x01"sv)) return "OpenEXR";
  if (starts_with(b, "GIF"sv)) return "GIF (unknown version)";
  if (b.size() >= 3 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7' &&
      (b[2] == '\n' || b[2] == ' ' || b[2] == '\r'))
    return "PNM/PAM";
  if (b.size() >= 3 && b[0] == 0x0a && b[1] <= 5 && b[2] == 1) return "PCX";
  return nullptr;
}

std::string first_bytes(std::span<const uint8_t> b) {
  std::string s;
  for (size_t i = 0; i < b.size() && i < 8; ++i) s += fmt::format("{}{:02x}", i ? " " : "", b[i]);
  return s;
}

// Pillow's alpha_composite of (r, g, b, a) over opaque white, one channel (AlphaComposite.c:
// 7 fractional bits, division by 255 as ((x >> 8) + x) >> 8).
uint8_t over_white(uint32_t c, uint32_t a) {
  if (a == 0) return 255;
  constexpr uint32_t kBits = 7;
  const uint32_t blend = 255 * (255 - a);
  const uint32_t outa255 = a * 255 + blend;
  const uint32_t coef1 = a * 255 * 255 * (1u << kBits) / outa255;
  const uint32_t coef2 = 255 * (1u << kBits) - coef1;
  const uint32_t t = c * coef1 + 255 * coef2 + (0x80u << kBits);
  return static_cast<uint8_t>((((t >> 8) + t) >> 8) >> kBits);
}

// stb's last failure reason, printable: stb has paths that fail without setting one (so the
// reason is reset before each call) and one that puts the raw chunk type bytes in it.
std::string failure_reason() {
  const char* r = stbi__g_failure_reason;
  if (r == nullptr || *r == '\0') return "no reason given by the decoder";
  std::string out;
  for (; *r; ++r) {
    const auto c = static_cast<unsigned char>(*r);
    out += c >= 0x20 && c < 0x7f ? std::string(1, char(c)) : fmt::format("\\x{:02x}", c);
  }
  return out;
}

uint32_t le32(std::span<const uint8_t> b, size_t at) {
  return uint32_t(b[at]) | uint32_t(b[at + 1]) << 8 | uint32_t(b[at + 2]) << 16 | uint32_t(b[at + 3]) << 24;
}

// stb reads past the end of a BMP as zeros and "succeeds" (Pillow refuses such a file). For the
// uncompressed layouts the pixel rows' extent follows from the header: check the file holds them.
Status check_bmp_extent(std::span<const uint8_t> b, const std::string& name) {
  if (b.size() < 34 || le32(b, 14) < 40) return ok_status();  // OS/2 headers: leave to stb
  const int64_t w = static_cast<int32_t>(le32(b, 18)), h = static_cast<int32_t>(le32(b, 22));
  const int bpp = b[28] | b[29] << 8;
  const uint32_t compression = le32(b, 30);
  if (compression != 0 && compression != 3 && compression != 6) return ok_status();  // RLE: variable size
  if (w <= 0 || bpp <= 0 || bpp > 32) return ok_status();  // stb rejects these itself
  const int64_t stride = (w * bpp + 31) / 32 * 4;
  const int64_t end = int64_t{le32(b, 10)} + stride * (h < 0 ? -h : h);
  if (end > static_cast<int64_t>(b.size())) {
    return invalid_file(
        fmt::format("{}: truncated BMP: the file has {} bytes but its {}x{} {}-bit pixel rows end at "
                    "byte {}",
                    name, b.size(), w, h < 0 ? -h : h, bpp, end));
  }
  return ok_status();
}

// stb_image 2.27 (Debian's libstb-dev 0.0~git20220908) trusts a JPEG DHT segment's 16 code
// counts: when they add up to more than 256, stbi__build_huffman writes past its 257-entry size
// table and the values loop past its 256-entry value table (a heap/stack overflow found by
// fuzz_image; newer stb checks n > 256). We cannot patch the system header, so such tables are
// refused before stb runs. stb finds a marker only right after an 0xFF byte, so every DHT it
// could read starts at some "FF C4" in the file: each one is checked the way stb would read it
// (bytes past the end read as 0, as stbi__get8 gives). The payloads of the APPn/COM segments
// that stb skips by length in the header are left out, so an EXIF blob does not trip the check.
Status check_jpeg_huffman_tables(std::span<const uint8_t> b, const std::string& name) {
  auto at = [&](size_t i) -> uint32_t { return i < b.size() ? b[i] : 0; };
  std::vector<bool> skipped(b.size(), false);
  for (size_t p = 2; p + 3 < b.size() && b[p] == 0xff;) {  // the header walk stb does, SOI to SOF
    while (p < b.size() && b[p] == 0xff) ++p;
    const uint32_t m = at(p), len = at(p + 1) << 8 | at(p + 2);
    if (len < 2 || (m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc) || m == 0xda || m == 0xd9)
      break;
    if ((m >= 0xe0 && m <= 0xef) || m == 0xfe)
      std::fill(skipped.begin() + std::min(b.size(), p + 3),
                skipped.begin() + std::min(b.size(), p + 1 + len), true);
    p += 1 + len;
  }
  for (size_t i = 0; i + 1 < b.size(); ++i) {
    if (b[i] != 0xff || b[i + 1] != 0xc4 || skipped[i + 1]) continue;
    size_t p = i + 2;
    int64_t left = int64_t(at(p) << 8 | at(p + 1)) - 2;
    p += 2;
    while (left > 0 && p <= b.size()) {
      const uint32_t q = at(p++);
      if ((q >> 4) > 1 || (q & 15) > 3) break;  // stb refuses the segment here
      uint32_t n = 0;
      for (int k = 0; k < 16; ++k) n += at(p++);
      if (n > 256) {
        return invalid_file(fmt::format(
            "{}: corrupt JPEG: Huffman table at byte {} declares {} codes (at most 256)", name, i, n));
      }
      p += n;
      left -= 17 + int64_t{n};
    }
  }
  return ok_status();
}

// stb_image 2.27 copies a zero-length first IDAT chunk into its still-null buffer
// (memcpy(NULL, p, 0): undefined behaviour, UBSan in stbi__getn; fuzz_image finding 4). PNG
// allows empty IDAT chunks and they carry nothing, so a copy without them decodes to the same
// image. Returns an empty vector when there is none (the common case: no copy). A chunk length
// past the end stops the walk; the rest is kept as is for stb to report.
std::vector<uint8_t> without_empty_idat(std::span<const uint8_t> b) {
  auto be32 = [&](size_t at) {
    return uint32_t{b[at]} << 24 | uint32_t{b[at + 1]} << 16 | uint32_t{b[at + 2]} << 8 | b[at + 3];
  };
  // stb copies an empty IDAT as soon as it has read the chunk's 8-byte header, before its CRC:
  // one whose CRC is cut off by the end of the file counts too.
  auto empty_idat = [&](size_t at) { return be32(at) == 0 && starts_with(b, "IDAT", at + 4); };
  auto chunk_end = [&](size_t at) { return at + 12 + uint64_t{be32(at)}; };  // may pass the end
  bool any = false;
  for (size_t at = 8; at + 8 <= b.size() && !any; at = chunk_end(at)) {
    any = empty_idat(at);
    if (chunk_end(at) > b.size()) break;
  }
  std::vector<uint8_t> out;
  if (!any) return out;
  out.assign(b.begin(), b.begin() + 8);
  size_t at = 8;
  while (at + 8 <= b.size()) {
    const uint64_t end = chunk_end(at);
    if (empty_idat(at)) {
      at = static_cast<size_t>(std::min<uint64_t>(end, b.size()));
      continue;
    }
    if (end > b.size()) break;
    out.insert(out.end(), b.begin() + at, b.begin() + static_cast<size_t>(end));
    at = static_cast<size_t>(end);
  }
  out.insert(out.end(), b.begin() + at, b.end());  // a truncated chunk, kept for stb to report
  return out;
}

}  // namespace

Result<Image> decode_image(std::span<const uint8_t> bytes, const std::string& name,
                           const ImageLimits& limits) {
  if (bytes.empty()) return invalid_file(fmt::format("{}: empty file (0 bytes), not an image", name));
  if (bytes.size() > limits.max_file_bytes) {
    return out_of_range(
        fmt::format("{}: image file is {} bytes, over the limit of {} bytes (ImageLimits::max_file_bytes)",
                    name, bytes.size(), limits.max_file_bytes));
  }
  Format format;
  if (!sniff_supported(bytes, &format)) {
    if (const char* other = sniff_unsupported(bytes)) {
      return unsupported(fmt::format("{}: unsupported image format {} ({})", name, other, kSupported));
    }
    return invalid_file(
        fmt::format("{}: not a PNG, JPEG, BMP or GIF image (first bytes: {})", name, first_bytes(bytes)));
  }
  const char* fname = format_name(format);
  if (bytes.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {  // stb takes an int length
    return out_of_range(
        fmt::format("{}: {} file of {} bytes is too large to decode", name, fname, bytes.size()));
  }
  const int len = static_cast<int>(bytes.size());

  // The header alone: dimensions are checked before anything is allocated for the pixels.
  // Before stb reads even the header: stbi_info parses the DHT segments before SOF too.
  if (format == Format::kJpeg) GEMMA3_TRY(check_jpeg_huffman_tables(bytes, name));
  int w = 0, h = 0, comp = 0;
  stbi__g_failure_reason = nullptr;
  if (!stbi_info_from_memory(bytes.data(), len, &w, &h, &comp)) {
    return invalid_file(
        fmt::format("{}: corrupt or truncated {} header ({})", name, fname, failure_reason()));
  }
  auto check_dims = [&](int cw, int ch) -> Status {
    if (cw <= 0 || ch <= 0) {
      return invalid_file(
          fmt::format("{}: {} image has size {}x{}, expected at least 1x1", name, fname, cw, ch));
    }
    if (cw > limits.max_side || ch > limits.max_side) {
      return out_of_range(
          fmt::format("{}: {} image is {}x{} pixels, over the limit of {} pixels per side "
                      "(ImageLimits::max_side)",
                      name, fname, cw, ch, limits.max_side));
    }
    if (int64_t{cw} * ch > limits.max_pixels) {
      return out_of_range(
          fmt::format("{}: {} image is {}x{} = {} pixels, over the limit of {} pixels "
                      "(ImageLimits::max_pixels)",
                      name, fname, cw, ch, int64_t{cw} * ch, limits.max_pixels));
    }
    return ok_status();
  };
  GEMMA3_TRY(check_dims(w, h));
  if (format == Format::kBmp) GEMMA3_TRY(check_bmp_extent(bytes, name));

  // Budget: the worst decoder (progressive JPEG with padded MCUs, 16-bit interlaced PNG) needs
  // about 20 bytes per pixel plus the compressed data; 32 per (padded) pixel + 2x the file is
  // generous for real images and still stops a zlib bomb behind a small header.
  Budget budget;
  budget.limit =
      static_cast<size_t>(32 * (int64_t{w} + 32) * (int64_t{h} + 32)) + 2 * bytes.size() + (size_t{16} << 20);
  t_budget = &budget;
  int dw = 0, dh = 0;
  stbi__g_failure_reason = nullptr;
  const std::vector<uint8_t> cleaned =
      format == Format::kPng ? without_empty_idat(bytes) : std::vector<uint8_t>();
  const std::span<const uint8_t> input = cleaned.empty() ? bytes : std::span<const uint8_t>(cleaned);
  stbi_uc* rgba = stbi_load_from_memory(input.data(), static_cast<int>(input.size()), &dw, &dh, &comp, 4);
  if (rgba == nullptr) {
    t_budget = nullptr;
    if (budget.exceeded) {
      return out_of_memory(
          fmt::format("{}: decoding the {}x{} {} image needs more than {} bytes (a decompression "
                      "bomb?); the budget is 32 bytes per pixel (of the size padded by 32), twice the file "
                      "size and 16 MiB",
                      name, w, h, fname, budget.limit));
    }
    return invalid_file(
        fmt::format("{}: cannot decode {} image ({}x{}): {}", name, fname, w, h, failure_reason()));
  }
  Status dims = check_dims(dw, dh);  // stb's decoder, not its header reader, had the last word
  Image image;
  if (dims.ok()) {
    image.width = dw;
    image.height = dh;
    const size_t n = size_t(dw) * size_t(dh);
    image.rgb.resize(n * 3);
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* s = rgba + 4 * i;
      uint8_t* d = image.rgb.data() + 3 * i;
      if (s[3] == 255) {
        d[0] = s[0], d[1] = s[1], d[2] = s[2];
      } else {
        d[0] = over_white(s[0], s[3]), d[1] = over_white(s[1], s[3]), d[2] = over_white(s[2], s[3]);
      }
    }
  }
  stbi_image_free(rgba);
  t_budget = nullptr;
  GEMMA3_TRY(dims);
  return image;
}

Result<Image> load_image(const std::string& path, const ImageLimits& limits) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) return not_found(fmt::format("{}: image file not found", path));
    return invalid_argument(fmt::format("{}: cannot open image file: {}", path, std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) return invalid_argument(fmt::format("{}: not a regular file", path));
  if (static_cast<uint64_t>(st.st_size) > limits.max_file_bytes) {
    return out_of_range(
        fmt::format("{}: image file is {} bytes, over the limit of {} bytes (ImageLimits::max_file_bytes)",
                    path, st.st_size, limits.max_file_bytes));
  }
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return invalid_argument(fmt::format("{}: cannot open image file: {}", path, std::strerror(errno)));
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  const size_t got = bytes.empty() ? 0 : std::fread(bytes.data(), 1, bytes.size(), f);
  const bool read_error = std::ferror(f) != 0;
  std::fclose(f);
  if (read_error || got != bytes.size()) {
    return invalid_file(fmt::format("{}: read {} of {} bytes of the image file", path, got, bytes.size()));
  }
  return decode_image(bytes, path, limits);
}

}  // namespace gemma3::vision
