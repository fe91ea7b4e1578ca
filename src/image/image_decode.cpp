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
// stb_image 2.27 (Debian's libstb-dev) is used as it is; what it gets wrong is fenced around it:
// the size each header declares is read here and checked against the limits before stb reads
// anything, some inputs are checked first (JPEG Huffman tables, BMP extent), and a copy of the
// file fixes the rest before stb decodes it (palettes padded with black, empty IDATs dropped).
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
#include <optional>
#include <string_view>
#include <utility>

#include "image/image.h"

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
// stb_image reads uncompressed and bit-field BMPs only; an RLE, JPEG or PNG payload would be
// refused as an "unknown image type", which reads like a corrupt file.
Status check_bmp_compression(std::span<const uint8_t> b, const std::string& name) {
  if (b.size() < 34 || le32(b, 14) < 40) return ok_status();  // OS/2 headers have no such field
  const uint32_t compression = le32(b, 30);
  const char* kinds[] = {nullptr, "RLE8", "RLE4", nullptr, "JPEG", "PNG"};
  if (compression >= 6 || !kinds[compression]) return ok_status();
  return unsupported(
      fmt::format("{}: BMP with {} compression is not supported (uncompressed and bit-field "
                  "BMPs are); convert it to PNG",
                  name, kinds[compression]));
}

// Bytes of a GIF colour table whose presence and size are in `flags` (header byte 10, or an
// image descriptor's byte 9).
size_t gif_table_bytes(uint8_t flags) { return (flags & 0x80) ? size_t{3} << ((flags & 7) + 1) : 0; }

// The first image of a GIF, the one decoded, must have begun before the file ends: the header,
// the global colour table, any extensions, the image descriptor, its local table and the LZW
// code size, and its first data byte. stb reads past the end as zeros and would return a blank
// image for a file cut before its pixels, or fail "for no reason" on a GIF with no image. (A cut
// inside the pixel data is padded, as libjpeg pads a cut JPEG: tests/test_image.cpp.)
Status check_gif_first_image(std::span<const uint8_t> b, const std::string& name) {
  auto cut = [&](const char* inside) {
    return invalid_file(
        fmt::format("{}: truncated GIF: the file ends (at {} bytes) inside {}", name, b.size(), inside));
  };
  if (b.size() < 13) return cut("the header");
  size_t at = 13 + gif_table_bytes(b[10]);
  if (at > b.size()) return cut("the global colour table");
  while (true) {
    if (at >= b.size()) return cut("the blocks before the first image");
    if (b[at] == 0x21) {  // extension: label, then sub-blocks up to an empty one
      at += 2;
      while (at < b.size() && b[at] != 0) at += 1 + size_t{b[at]};
      if (at >= b.size()) return cut("an extension block");
      ++at;
    } else if (b[at] == 0x2c) {
      if (at + 10 > b.size()) return cut("the first image descriptor");
      const size_t data = at + 10 + gif_table_bytes(b[at + 9]) + 1;  // past the LZW code size
      if (data > b.size()) return cut("the first image's colour table or code size");
      if (data == b.size()) return cut("the first image, before its pixel data");
      return ok_status();
    } else if (b[at] == 0x3b) {
      return invalid_file(fmt::format("{}: GIF without an image (its trailer comes first)", name));
    } else {
      return ok_status();  // a block stb refuses, with its own reason
    }
  }
}

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

uint32_t be32(std::span<const uint8_t> b, size_t at) {
  return uint32_t(b[at]) << 24 | uint32_t(b[at + 1]) << 16 | uint32_t(b[at + 2]) << 8 | uint32_t(b[at + 3]);
}

uint32_t le16(std::span<const uint8_t> b, size_t at) { return uint32_t(b[at]) | uint32_t(b[at + 1]) << 8; }

void put_le32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

// ---- header size, read before stb ----------------------------------------------------------
// stb's own header reader refuses some sizes before the limits can name them (a PNG with more
// than 2^30 bytes of pixels is "too large", so a 65535x65535 header read as "corrupt"), and
// gives a top-down BMP's height negative. So the size is read here first, from where each
// format stores it; nullopt when the header is too short or not where expected (stb then says
// what is wrong).
struct HeaderSize {
  int64_t width = 0, height = 0;
};

std::optional<HeaderSize> header_size(std::span<const uint8_t> b, Format format) {
  switch (format) {
    case Format::kPng: {  // IHDR, the first chunk (after Apple's CgBI chunk, which stb allows)
      uint64_t at = 8;
      if (b.size() >= at + 12 && starts_with(b, "CgBI", at + 4)) at += 12 + uint64_t{be32(b, at)};
      if (b.size() < at + 16 || be32(b, at) != 13 || !starts_with(b, "IHDR", at + 4)) return std::nullopt;
      return HeaderSize{be32(b, at + 8), be32(b, at + 12)};
    }
    case Format::kJpeg: {  // the first SOFn segment: height at +3, width at +5 after the marker
      // The walk stb's header reader does: a marker is FF (fill FFs) then a code; bytes between
      // segments that are not a marker are skipped; segments are skipped by their length.
      size_t p = 2;
      while (p < b.size()) {
        if (b[p] != 0xff) {
          ++p;
          continue;
        }
        while (p < b.size() && b[p] == 0xff) ++p;
        if (p + 2 >= b.size()) return std::nullopt;
        const uint8_t m = b[p++];
        if (m == 0x01 || (m >= 0xd0 && m <= 0xd8)) continue;  // TEM, RSTn, SOI: no length
        if (m == 0xd9 || m == 0xda) return std::nullopt;      // EOI or SOS before any SOF
        const size_t len = size_t{b[p]} << 8 | b[p + 1];
        if (m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc) {
          if (len < 7 || p + 7 > b.size()) return std::nullopt;
          return HeaderSize{b[p + 5] << 8 | b[p + 6], b[p + 3] << 8 | b[p + 4]};
        }
        if (len < 2) return std::nullopt;
        p += len;
      }
      return std::nullopt;
    }
    case Format::kBmp: {  // after the 14-byte file header: the info header's size, then the size
      if (b.size() < 22) return std::nullopt;
      if (le32(b, 14) == 12) return HeaderSize{le16(b, 18), le16(b, 20)};  // OS/2: unsigned 16-bit
      if (b.size() < 26) return std::nullopt;
      const int64_t w = static_cast<int32_t>(le32(b, 18)), h = static_cast<int32_t>(le32(b, 22));
      return HeaderSize{w, h < 0 ? -h : h};  // a negative height means rows stored top to bottom
    }
    case Format::kGif:  // the logical screen, which is the size of every frame stb returns
      if (b.size() < 10) return std::nullopt;
      return HeaderSize{le16(b, 6), le16(b, 8)};
  }
  return std::nullopt;
}

// ---- palettes: indices past the entries a file gives ----------------------------------------
// stb 2.27 looks a pixel's palette index up unchecked in a 256-entry table that holds only the
// entries the file gave: for PNG (PLTE) and BMP that table is an uninitialized stack array, so
// an index past the entries read whatever the stack held (a different image from run to run;
// valgrind: "conditional jump depends on uninitialised value"). GIF's tables are zeroed, so
// such an index is transparent there. Pillow, the reference, zero-fills its palette past the
// file's entries: such an index is opaque black (checked with Pillow 13 for each format below,
// including a PNG tRNS longer than PLTE, whose alphas then apply to those black entries).
// So before stb runs, each palette is padded to all the entries its indices can reach, with
// black: the image is then defined and the one Pillow shows.

uint32_t crc32(std::span<const uint8_t> data) {
  uint32_t c = 0xffffffffu;
  for (uint8_t v : data) {
    c ^= v;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
  }
  return ~c;
}

// A copy of the PNG for stb, or an empty vector when it needs none (the common case: no copy):
//  * an indexed-colour image's PLTE chunks padded to 256 entries (above), with a new CRC;
//  * zero-length IDAT chunks dropped: stb 2.27 copies a zero-length first IDAT chunk into its
//    still-null buffer (memcpy(NULL, p, 0): undefined behaviour, UBSan in stbi__getn; fuzz_image
//    finding 4). PNG allows empty IDAT chunks and they carry nothing. stb copies one as soon as
//    it has read the chunk's 8-byte header, before its CRC: one whose CRC is cut off by the end
//    of the file counts too.
// A chunk length past the end stops the walk; the rest is kept as is for stb to report.
std::vector<uint8_t> png_for_stb(std::span<const uint8_t> b) {
  std::vector<uint8_t> out;
  bool copying = false;
  int color_type = -1;  // from IHDR; 3 = indexed colour
  size_t at = 8;
  auto start_copy = [&] {
    if (!copying) out.assign(b.begin(), b.begin() + at);
    copying = true;
  };
  while (at + 8 <= b.size()) {
    const uint32_t len = be32(b, at);
    const uint64_t end = at + 12 + uint64_t{len};  // may pass the end of the file
    if (len == 0 && starts_with(b, "IDAT", at + 4)) {
      start_copy();
      at = static_cast<size_t>(std::min<uint64_t>(end, b.size()));
      continue;
    }
    if (end > b.size()) break;
    if (len == 13 && starts_with(b, "IHDR", at + 4)) color_type = b[at + 17];
    // stb itself refuses a PLTE that is empty, longer than 256 entries or not whole entries.
    if (color_type == 3 && starts_with(b, "PLTE", at + 4) && len > 0 && len < 768 && len % 3 == 0) {
      start_copy();
      const size_t chunk = out.size();
      const uint8_t header[8] = {0, 0, 3, 0, 'P', 'L', 'T', 'E'};  // length 768
      out.insert(out.end(), header, header + 8);
      out.insert(out.end(), b.begin() + at + 8, b.begin() + at + 8 + len);
      out.resize(out.size() + (768 - len), 0);  // black
      const uint32_t crc = crc32(std::span<const uint8_t>(out).subspan(chunk + 4, 4 + 768));
      for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(crc >> s));
    } else if (copying) {
      out.insert(out.end(), b.begin() + at, b.begin() + static_cast<size_t>(end));
    }
    at = static_cast<size_t>(end);
  }
  if (copying) out.insert(out.end(), b.begin() + at, b.end());
  return out;
}

// A copy of the BMP for stb with its palette padded to 2^bpp entries, or an empty vector when
// stb reads a full palette (or refuses the file itself). stb sizes the palette from the pixel
// data offset: (offset - 14 - header size) / 4 entries, for OS/2 headers (offset - 38) / 3
// (four fewer than the file holds), and an offset inside the header makes that count negative,
// so that no entry is read at all.
Result<std::vector<uint8_t>> bmp_for_stb(std::span<const uint8_t> b, const std::string& name) {
  std::vector<uint8_t> out;
  if (b.size() < 30) return out;
  const int64_t hsz = le32(b, 14);
  if (hsz != 12 && hsz != 40 && hsz != 56 && hsz != 108 && hsz != 124) return out;
  const int bpp = static_cast<int>(hsz == 12 ? le16(b, 24) : le16(b, 28));
  if (bpp != 1 && bpp != 4 && bpp != 8) return out;
  const int64_t offset = static_cast<int32_t>(le32(b, 10));  // stb reads it as an int
  if (hsz != 12 && b.size() >= 34 && (le32(b, 30) == 1 || le32(b, 30) == 2)) return out;  // RLE: refused
  const int64_t entry = hsz == 12 ? 3 : 4, pal_at = 14 + hsz, needed = int64_t{1} << bpp;
  // stb's count, its C arithmetic: truncating division, and an arithmetic shift for >> 2.
  const int64_t stb_entries = hsz == 12 ? (offset - 38) / 3 : (offset - pal_at) >> 2;
  if (stb_entries == 0 || stb_entries >= needed || offset < 0) return out;  // stb refuses or is fine
  if (offset < pal_at) {
    return invalid_file(fmt::format(
        "{}: corrupt BMP: its pixel data offset {} points inside its {}-byte header", name, offset, pal_at));
  }
  if (static_cast<int64_t>(b.size()) < pal_at) return out;  // stb reports the short header
  const int64_t data_at = std::min<int64_t>(offset, static_cast<int64_t>(b.size()));
  const int64_t given = std::min((data_at - pal_at) / entry, needed);
  const int64_t entries = hsz == 12 ? needed + 4 : needed;  // so that stb's count is `needed`
  out.assign(b.begin(), b.begin() + pal_at);
  out.insert(out.end(), b.begin() + pal_at, b.begin() + pal_at + given * entry);
  out.resize(static_cast<size_t>(pal_at + entries * entry), 0);  // black
  out.insert(out.end(), b.begin() + data_at, b.end());
  put_le32(out, 2, static_cast<uint32_t>(out.size()));
  put_le32(out, 10, static_cast<uint32_t>(pal_at + entries * entry));
  return out;
}

// A copy of the GIF for stb with the global colour table and the first image's local one
// padded to 256 entries, or an empty vector when they hold 256 already (or stb is left to
// report a broken file). stb decodes only the first image; its tables are zero-filled, so an
// index past a table would be transparent (white after compositing) instead of Pillow's black.
std::vector<uint8_t> gif_for_stb(std::span<const uint8_t> b) {
  std::vector<uint8_t> out;
  if (b.size() < 13) return out;
  // Where each table's flags byte and the table are, if they need padding.
  std::vector<std::pair<size_t, size_t>> pads;  // (flags byte, table start)
  size_t at = 13 + gif_table_bytes(b[10]);
  if ((b[10] & 0x80) && (b[10] & 7) != 7) pads.emplace_back(10, 13);
  while (at < b.size()) {
    if (b[at] == 0x21) {  // extension: label, then sub-blocks up to an empty one
      at += 2;
      while (at < b.size() && b[at] != 0) at += 1 + size_t{b[at]};
      ++at;
    } else if (b[at] == 0x2c) {  // the first image descriptor: flags at +9, its table at +10
      if (at + 10 > b.size()) break;
      if ((b[at + 9] & 0x80) && (b[at + 9] & 7) != 7) pads.emplace_back(at + 9, at + 10);
      break;
    } else {
      break;  // the trailer or a byte stb refuses
    }
  }
  if (pads.empty()) return out;
  size_t from = 0;
  for (const auto& [flags_at, table_at] : pads) {
    const size_t bytes = gif_table_bytes(b[flags_at]);
    if (table_at + bytes > b.size()) break;  // a cut table: stb reads it as zeros anyway
    const size_t shift = out.size() - from;  // what the tables padded so far added
    out.insert(out.end(), b.begin() + from, b.begin() + table_at + bytes);
    out[flags_at + shift] = static_cast<uint8_t>(b[flags_at] | 7);  // 2^(7+1) = 256 entries
    out.resize(out.size() + 768 - bytes, 0);                        // black
    from = table_at + bytes;
  }
  out.insert(out.end(), b.begin() + from, b.end());
  return out;
}

}  // namespace

Status check_image_file_size(uint64_t bytes, const std::string& name, const ImageLimits& limits) {
  if (bytes <= limits.max_file_bytes) return ok_status();
  return invalid_file(
      fmt::format("{}: image file is {} bytes, over the limit of {} bytes (ImageLimits::max_file_bytes)",
                  name, bytes, limits.max_file_bytes));
}

Result<Image> decode_image(std::span<const uint8_t> bytes, const std::string& name,
                           const ImageLimits& limits) {
  if (bytes.empty()) return invalid_file(fmt::format("{}: empty file (0 bytes), not an image", name));
  GEMMA3_TRY(check_image_file_size(bytes.size(), name, limits));
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
    return invalid_file(
        fmt::format("{}: {} file of {} bytes is too large to decode", name, fname, bytes.size()));
  }

  // The header alone: dimensions are checked before anything is allocated for the pixels, and
  // before stb reads the header (its reader refuses some sizes the limits should name).
  auto check_dims = [&](int64_t cw, int64_t ch) -> Status {
    if (cw <= 0 || ch <= 0) {
      return invalid_file(
          fmt::format("{}: {} image has size {}x{}, expected at least 1x1", name, fname, cw, ch));
    }
    if (cw > limits.max_side || ch > limits.max_side) {
      return invalid_file(
          fmt::format("{}: {} image is {}x{} pixels, over the limit of {} pixels per side "
                      "(ImageLimits::max_side)",
                      name, fname, cw, ch, limits.max_side));
    }
    if (cw * ch > limits.max_pixels) {
      return invalid_file(
          fmt::format("{}: {} image is {}x{} = {} pixels, over the limit of {} pixels "
                      "(ImageLimits::max_pixels)",
                      name, fname, cw, ch, cw * ch, limits.max_pixels));
    }
    return ok_status();
  };
  if (const std::optional<HeaderSize> size = header_size(bytes, format))
    GEMMA3_TRY(check_dims(size->width, size->height));
  // stbi_info parses the JPEG DHT segments before SOF too.
  if (format == Format::kJpeg) GEMMA3_TRY(check_jpeg_huffman_tables(bytes, name));
  if (format == Format::kBmp) GEMMA3_TRY(check_bmp_compression(bytes, name));
  if (format == Format::kGif) GEMMA3_TRY(check_gif_first_image(bytes, name));
  int w = 0, h = 0, comp = 0;
  stbi__g_failure_reason = nullptr;
  if (!stbi_info_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &comp)) {
    return invalid_file(
        fmt::format("{}: corrupt or truncated {} header ({})", name, fname, failure_reason()));
  }
  if (format == Format::kBmp && h < 0) h = h == std::numeric_limits<int>::min() ? 0 : -h;  // top-down rows
  GEMMA3_TRY(check_dims(w, h));

  // The copy stb decodes, when the file needs one (palettes padded, empty IDATs dropped).
  std::vector<uint8_t> cleaned;
  if (format == Format::kPng) cleaned = png_for_stb(bytes);
  if (format == Format::kGif) cleaned = gif_for_stb(bytes);
  if (format == Format::kBmp) {
    GEMMA3_TRY(check_bmp_extent(bytes, name));
    GEMMA3_ASSIGN_OR_RETURN(cleaned, bmp_for_stb(bytes, name));
  }
  const std::span<const uint8_t> input = cleaned.empty() ? bytes : std::span<const uint8_t>(cleaned);

  // Budget: the worst decoder (progressive JPEG with padded MCUs, 16-bit interlaced PNG) needs
  // about 20 bytes per pixel plus the compressed data; 32 per (padded) pixel + 2x the file is
  // generous for real images and still stops a zlib bomb behind a small header.
  Budget budget;
  budget.limit =
      static_cast<size_t>(32 * (int64_t{w} + 32) * (int64_t{h} + 32)) + 2 * bytes.size() + (size_t{16} << 20);
  t_budget = &budget;
  int dw = 0, dh = 0;
  stbi__g_failure_reason = nullptr;
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
  GEMMA3_TRY(check_image_file_size(static_cast<uint64_t>(st.st_size), path, limits));
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
