#include "text/tokenizer_bpe.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <map>
#include <unordered_map>

namespace gemma3 {
namespace {

constexpr uint32_t kSpaceSymbol = 0x2581;  // "▁", what SentencePiece turns ' ' into
constexpr std::string_view kSpaceSymbolUtf8 = "\xE2\x96\x81";
constexpr int kMaxUserDefinedPrefixes = 64;  // sentencepiece's PrefixMatcher reads at most 64 matches
// A character's neighbours inside pieces are kept as a list when there are at most this many;
// more makes it "many" (never a cut point on that side).
constexpr size_t kMaxNeighbours = 24;

bool is_normal_type(PieceType t) {  // SentencePiece's pieces_ (merge targets) vs reserved_id_map_
  return t == PieceType::kNormal || t == PieceType::kUserDefined || t == PieceType::kUnused;
}

uint64_t mix(uint64_t a, uint64_t b) {
  const unsigned __int128 m = static_cast<unsigned __int128>(a) * b;
  return static_cast<uint64_t>(m) ^ static_cast<uint64_t>(m >> 64);
}

uint64_t load64(const char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}
uint32_t load32(const char* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xD6E8FEB86659FD93ull);
  for (; n >= 8; p += 8, n -= 8) h = mix(h ^ load64(p), 0xBF58476D1CE4E5B9ull);
  // The last 0..7 bytes without a variable-length copy (n is already in h, so overlapping
  // reads still identify the bytes).
  uint64_t w = 0;
  if (n >= 4) {
    w = load32(p) | (uint64_t{load32(p + n - 4)} << 32);
  } else if (n > 0) {
    w = static_cast<uint8_t>(p[0]) | (uint32_t{static_cast<uint8_t>(p[n / 2])} << 8) |
        (uint32_t{static_cast<uint8_t>(p[n - 1])} << 16);
  }
  return mix(h ^ w ^ 0x94D049BB133111EBull, 0x2545F4914F6CDD1Dull);
}

size_t utf8_len(uint8_t lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

// Decodes the valid UTF-8 character at p (the input was validated before).
uint32_t utf8_decode(const uint8_t* p, size_t len) {
  switch (len) {
    case 1: return p[0];
    case 2: return (uint32_t{p[0] & 0x1Fu} << 6) | (p[1] & 0x3Fu);
    case 3: return (uint32_t{p[0] & 0x0Fu} << 12) | (uint32_t{p[1] & 0x3Fu} << 6) | (p[2] & 0x3Fu);
    default:
      return (uint32_t{p[0] & 0x07u} << 18) | (uint32_t{p[1] & 0x3Fu} << 12) | (uint32_t{p[2] & 0x3Fu} << 6) |
             (p[3] & 0x3Fu);
  }
}

// Code points of a piece, or false when it is not valid UTF-8.
bool decode_piece(std::string_view s, std::vector<uint32_t>& cps) {
  cps.clear();
  size_t i = 0;
  while (i < s.size()) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    size_t n;
    if (c < 0x80)
      n = 1;
    else if (c >= 0xC2 && c <= 0xDF)
      n = 2;
    else if (c >= 0xE0 && c <= 0xEF)
      n = 3;
    else if (c >= 0xF0 && c <= 0xF4)
      n = 4;
    else
      return false;
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<uint8_t>(s[i + k]) & 0xC0) != 0x80) return false;
    const uint32_t cp = utf8_decode(reinterpret_cast<const uint8_t*>(s.data() + i), n);
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    cps.push_back(cp);
    i += n;
  }
  return true;
}

// Every piece's bytes, by id (offsets, not string_views: 4 bytes per piece keeps more of the
// table in cache).
struct PieceText {
  std::string pool;
  std::vector<uint32_t> offset;  // [n_vocab + 1]
  std::string_view operator[](int32_t id) const {
    return std::string_view(pool.data() + offset[id], offset[id + 1] - offset[id]);
  }
};

// Piece text -> id, open addressing. The key is compared byte for byte, so a hash collision
// never changes a result.
class PieceTable {
 public:
  void build(const PieceText& text, const std::vector<int32_t>& ids) {
    size_t cap = 16;
    while (cap < ids.size() * 2) cap *= 2;
    slots_.assign(cap, Slot{0, -1});
    mask_ = cap - 1;
    for (int32_t id : ids) {
      const uint64_t h = hash_bytes(text[id].data(), text[id].size());
      size_t i = h & mask_;
      while (slots_[i].id >= 0) i = (i + 1) & mask_;
      slots_[i] = Slot{static_cast<uint32_t>(h >> 32), id};
    }
  }
  int32_t find(const char* p, size_t n, const PieceText& text) const {
    if (slots_.empty()) return -1;
    const uint64_t h = hash_bytes(p, n);
    const uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot s = slots_[i];
      if (s.id < 0) return -1;
      if (s.tag != tag) continue;
      const std::string_view piece = text[s.id];
      if (piece.size() == n && std::memcmp(piece.data(), p, n) == 0) return s.id;
    }
  }

 private:
  struct Slot {
    uint32_t tag;  // high half of the key's hash
    int32_t id;    // -1: empty
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// Pieces of 1..8 bytes (no NUL byte in them: checked) with their bytes, id and score in the
// slot: a BPE step's lookup reads one cache line instead of slot, offset, text and score.
class ShortPieceTable {
 public:
  struct Slot {
    uint64_t key;  // the piece's bytes, little-endian, zero-padded; 0: empty
    int32_t id;
    float score;
  };
  static uint64_t pack(const char* p, size_t n) {
    uint64_t key = 0;
    std::memcpy(&key, p, n);
    return key;
  }
  // pack() where 8 bytes may be read from p (the chunk buffer has 8 bytes of slack).
  static uint64_t pack_padded(const char* p, size_t n) {
    return n == 8 ? load64(p) : load64(p) & ((uint64_t{1} << (8 * n)) - 1);
  }
  void build(const PieceText& text, const std::vector<int32_t>& ids, const std::vector<float>& score) {
    size_t cap = 16;
    while (cap < ids.size() * 2) cap *= 2;
    slots_.assign(cap, Slot{0, -1, 0.0f});
    mask_ = cap - 1;
    for (int32_t id : ids) {
      const uint64_t key = pack(text[id].data(), text[id].size());
      size_t i = index(key);
      while (slots_[i].key != 0) i = (i + 1) & mask_;
      slots_[i] = Slot{key, id, score[id]};
    }
  }
  // n in 1..8. The key alone does not give n when the text has NUL bytes ("a\0" packs as "a"),
  // so the piece's length (its highest non-zero byte) is compared too.
  const Slot* find_padded(const char* p, size_t n) const { return find_key(pack_padded(p, n), n); }
  const Slot* find(const char* p, size_t n) const { return find_key(pack(p, n), n); }

 private:
  const Slot* find_key(uint64_t key, size_t n) const {
    for (size_t i = index(key);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == 0) return nullptr;
      if (s.key == key) return (71 - std::countl_zero(key)) / 8 == static_cast<int>(n) ? &s : nullptr;
    }
  }
  size_t index(uint64_t key) const { return mix(key, 0x9E3779B97F4A7C15ull) & mask_; }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

}  // namespace

struct BpeEncoder::Tables {
  PieceText text;
  std::vector<float> score;  // [n_vocab]
  // NORMAL / USER_DEFINED / UNUSED pieces (sentencepiece's pieces_, the merge targets), by
  // length: most BPE lookups are for at most 8 bytes.
  ShortPieceTable short_pieces;
  PieceTable long_pieces;
  // The most frequent lookups, indexed directly (L1/L2-resident): two ASCII bytes, and "▁"
  // followed by one.
  struct Direct {
    int32_t id = -1;
    float score = 0.0f;
  };
  std::vector<Direct> ascii_pairs;  // [128 * 128]
  std::array<Direct, 128> space_ascii{};
  PieceTable reserved;  // CONTROL / UNKNOWN / BYTE (win in the final id lookup)
  std::vector<std::pair<int32_t, int32_t>> overrides;  // sorted: merge-target id whose text is also reserved
  size_t max_piece = 0;                                // bytes of the longest merge target
  int32_t unk_id = -1;
  bool byte_fallback = false;
  std::array<int32_t, 256> byte_id{};  // id of "<0xHH>" (sentencepiece's PieceToId(ByteToPiece(b)))

  // USER_DEFINED pieces as a byte trie (longest match at a position = one frozen symbol).
  struct TrieNode {
    int32_t id = -1;  // the piece ending here, or -1
    uint32_t edge_begin = 0, edge_count = 0;
  };
  std::vector<TrieNode> trie;
  std::vector<std::pair<uint8_t, uint32_t>> trie_edges;  // (byte, child), sorted per node
  std::array<bool, 256> ud_first{};

  // Cut points. For a character c: the characters found just before c / just after c inside
  // some merge target. 0: none (a cut next to c is always safe on that side); kMany: too many
  // to list; else 1 + index into `lists`.
  static constexpr uint32_t kMany = 0xFFFF;
  std::vector<uint16_t> before_bmp, after_bmp;  // [0x10000]
  std::unordered_map<uint32_t, uint32_t> before_other, after_other;
  std::vector<std::pair<uint32_t, uint32_t>> lists;  // (begin, count) into list_pool
  std::vector<uint32_t> list_pool;

  uint32_t before(uint32_t cp) const {
    if (cp < 0x10000) return before_bmp[cp];
    auto it = before_other.find(cp);
    return it == before_other.end() ? 0 : it->second;
  }
  uint32_t after(uint32_t cp) const {
    if (cp < 0x10000) return after_bmp[cp];
    auto it = after_other.find(cp);
    return it == after_other.end() ? 0 : it->second;
  }
  bool listed(uint32_t entry, uint32_t cp) const {
    const auto [begin, count] = lists[entry - 1];
    const uint32_t* p = list_pool.data() + begin;
    return std::find(p, p + count, cp) != p + count;
  }

  // No merge target contains "ab": no symbol can ever span the point between a and b.
  bool boundary_safe(uint32_t a, uint32_t b) const {
    const uint32_t before_b = before(b);
    if (before_b == 0) return true;
    if (before_b != kMany) return !listed(before_b, a);
    const uint32_t after_a = after(a);
    if (after_a == 0) return true;
    if (after_a != kMany) return !listed(after_a, b);
    return false;
  }
  // boundary_safe for two ASCII bytes of the raw text (' ' standing for "▁"): bit a * 128 + b.
  std::array<uint64_t, 128 * 128 / 64> ascii_safe{};
  bool ascii_boundary_safe(uint8_t a, uint8_t b) const {
    const uint32_t bit = uint32_t{a} * 128 + b;
    return (ascii_safe[bit >> 6] >> (bit & 63)) & 1;
  }

  int32_t find_merge_target(std::string_view s) const {
    if (s.empty() || s.size() > max_piece) return -1;
    if (s.size() <= 8) {
      const ShortPieceTable::Slot* slot = short_pieces.find(s.data(), s.size());
      return slot ? slot->id : -1;
    }
    return long_pieces.find(s.data(), s.size(), text);
  }

  int32_t final_id(int32_t id) const {  // sentencepiece's PieceToId: reserved pieces first
    if (overrides.empty()) return id;
    auto it = std::lower_bound(overrides.begin(), overrides.end(), std::make_pair(id, INT32_MIN));
    return it != overrides.end() && it->first == id ? it->second : id;
  }
};

struct BpeEncoder::Scratch {
  std::string norm;  // the chunk with ' ' as "▁", then 8 bytes of slack (ShortPieceTable::find_padded)
  // 16 bytes per symbol and 12 per candidate: a text with no cut point is one chunk with a
  // symbol per character and about as many candidates.
  static constexpr uint32_t kDead = UINT32_MAX;  // Symbol::begin once merged into its left neighbour
  static constexpr int32_t kFrozen = 1 << 30;    // Symbol::id flag: a USER_DEFINED match, never merged
  struct Symbol {
    uint32_t begin;      // first byte in norm (a live symbol ends where the next one begins)
    int32_t prev, next;  // neighbours, -1 at the ends
    int32_t id;          // piece id (| kFrozen); -1: a single character not looked up yet
  };
  std::vector<Symbol> syms;
  struct Candidate {  // merging syms[left] with its right neighbour gives a piece
    float score;
    uint32_t left;
    uint32_t id_size;  // the piece's id | its bytes << 22 (ids < 2^22, pieces < 1024 bytes: checked)
  };
  std::vector<Candidate> heap;

  // Only for long texts (allocating them costs more than a short text's encode):
  // Chunk -> ids, 4-way set associative (most recently used first), one cache line per entry.
  struct alignas(64) CacheEntry {
    uint64_t hash = 0;
    uint8_t key_len = 0, n_ids = 0;
    char key[22];
    int32_t ids[8];
  };
  static constexpr size_t kCacheKeyMax = sizeof(CacheEntry::key), kCacheIdsMax = 8, kCacheWays = 4;
  std::vector<CacheEntry> cache;  // [sets x kCacheWays], sets a power of 2; or empty
};

void BpeEncoder::ScratchDeleter::operator()(Scratch* s) const { delete s; }

BpeEncoder::ScratchPtr BpeEncoder::new_scratch(size_t text_bytes) {
  ScratchPtr s(new Scratch);
  if (text_bytes >= 16384) {
    // As many bytes as the text, 4 MB at most (16K sets x 4 ways x 64 B): ~95% of the chunks
    // of a long English text hit.
    s->cache.resize(
        std::min<size_t>(size_t{1} << 16, std::bit_floor(text_bytes / sizeof(Scratch::CacheEntry))));
  }
  return s;
}

BpeEncoder::BpeEncoder(std::unique_ptr<Tables> t) : t_(std::move(t)) {}
BpeEncoder::~BpeEncoder() = default;

Result<std::unique_ptr<const BpeEncoder>> BpeEncoder::build(const std::vector<spm::Piece>& pieces,
                                                            const spm::EncodingSpec& spec) {
  if (spec.model_type != 2) return unsupported(fmt::format("model type {} is not BPE (2)", spec.model_type));
  if (spec.has_precompiled_charsmap) return unsupported("the normalizer has a precompiled character map");
  if (spec.add_dummy_prefix) return unsupported("the normalizer adds a dummy prefix");
  if (spec.remove_extra_whitespaces) return unsupported("the normalizer removes extra whitespace");
  if (!spec.escape_whitespaces) return unsupported("the normalizer does not escape whitespace");
  if (spec.treat_whitespace_as_suffix) return unsupported("the model treats whitespace as a suffix");
  auto t = std::make_unique<Tables>();
  const size_t n = pieces.size();
  t->byte_fallback = spec.byte_fallback;
  size_t pool = 0;
  for (const spm::Piece& p : pieces) pool += p.piece.size();
  if (pool >= UINT32_MAX) return unsupported("the pieces hold more than 4 GiB of text");
  t->text.pool.reserve(pool);
  t->text.offset.reserve(n + 1);
  for (const spm::Piece& p : pieces) {
    t->text.offset.push_back(static_cast<uint32_t>(t->text.pool.size()));
    t->text.pool += p.piece;
  }
  t->text.offset.push_back(static_cast<uint32_t>(t->text.pool.size()));
  t->score.resize(n);
  std::vector<int32_t> normal_ids, reserved_ids;
  for (size_t i = 0; i < n; ++i) {
    const spm::Piece& p = pieces[i];
    t->score[i] = p.score;
    if (p.piece.find('\0') != std::string::npos)
      return unsupported(fmt::format("piece {} contains a NUL byte", i));
    if (is_normal_type(p.type)) {
      if (std::isnan(p.score)) return unsupported(fmt::format("piece {} has a NaN score", i));
      normal_ids.push_back(static_cast<int32_t>(i));
      t->max_piece = std::max(t->max_piece, p.piece.size());
    } else {
      reserved_ids.push_back(static_cast<int32_t>(i));
      if (p.type == PieceType::kUnknown && t->unk_id < 0) t->unk_id = static_cast<int32_t>(i);
    }
  }
  if (t->unk_id < 0) return unsupported("no UNKNOWN piece");
  if (n > (size_t{1} << 22)) return unsupported("more than 2^22 pieces");  // Scratch::Candidate::id_size
  if (t->max_piece >= 1024) return unsupported("a piece of 1024 bytes or more");
  std::vector<int32_t> short_ids, long_ids;
  for (int32_t id : normal_ids) (t->text[id].size() <= 8 ? short_ids : long_ids).push_back(id);
  t->short_pieces.build(t->text, short_ids, t->score);
  t->long_pieces.build(t->text, long_ids);
  auto direct = [&](std::string_view key) {
    const int32_t id = t->find_merge_target(key);
    return id < 0 ? Tables::Direct{} : Tables::Direct{id, t->score[id]};
  };
  t->ascii_pairs.resize(128 * 128);
  for (int a = 0; a < 128; ++a) {
    for (int b = 0; b < 128; ++b) {
      const char key[2] = {static_cast<char>(a), static_cast<char>(b)};
      t->ascii_pairs[a * 128 + b] = direct(std::string_view(key, 2));
    }
    t->space_ascii[a] = direct(std::string(kSpaceSymbolUtf8) + static_cast<char>(a));
  }
  t->reserved.build(t->text, reserved_ids);
  // A final symbol is looked up among the reserved pieces first. When that finds a CONTROL
  // piece, sentencepiece fails the whole Encode (a control piece has no surface text): leave
  // such vocabularies to the library, errors included.
  for (int32_t id : normal_ids) {
    const int32_t r = t->reserved.find(t->text[id].data(), t->text[id].size(), t->text);
    if (r < 0) continue;
    if (pieces[r].type == PieceType::kControl)
      return unsupported(fmt::format("piece {} has the text of CONTROL piece {}", id, r));
    t->overrides.emplace_back(id, r);
  }
  for (int32_t id : reserved_ids) {
    const std::string_view s = t->text[id];
    if (pieces[id].type == PieceType::kControl && s.size() == utf8_len(static_cast<uint8_t>(s[0])))
      return unsupported(fmt::format("CONTROL piece {} is a single character", id));
  }
  for (int b = 0; b < 256; ++b) {
    const std::string s = fmt::format("<0x{:02X}>", b);
    int32_t id = t->reserved.find(s.data(), s.size(), t->text);
    if (id < 0) id = t->find_merge_target(s);
    t->byte_id[b] = id < 0 ? t->unk_id : t->final_id(id);
  }

  // USER_DEFINED trie.
  std::vector<std::map<uint8_t, uint32_t>> children(1);
  std::vector<int32_t> node_id(1, -1);
  for (int32_t id : normal_ids) {
    if (pieces[id].type != PieceType::kUserDefined) continue;
    // sentencepiece's normalizer copies a USER_DEFINED match in the raw text as it is, so a
    // space inside one would stay a space instead of becoming "▁".
    if (t->text[id].find(' ') != std::string_view::npos)
      return unsupported(fmt::format("USER_DEFINED piece {} contains a space", id));
    uint32_t node = 0;
    for (char ch : t->text[id]) {
      const uint8_t b = static_cast<uint8_t>(ch);
      auto it = children[node].find(b);
      if (it != children[node].end()) {
        node = it->second;
        continue;
      }
      const uint32_t child = static_cast<uint32_t>(children.size());
      children[node].emplace(b, child);
      children.emplace_back();
      node_id.push_back(-1);
      node = child;
    }
    node_id[node] = id;
    t->ud_first[static_cast<uint8_t>(t->text[id][0])] = true;
  }
  t->trie.resize(children.size());
  for (size_t i = 0; i < children.size(); ++i) {
    t->trie[i].id = node_id[i];
    t->trie[i].edge_begin = static_cast<uint32_t>(t->trie_edges.size());
    t->trie[i].edge_count = static_cast<uint32_t>(children[i].size());
    for (const auto& [b, child] : children[i]) t->trie_edges.emplace_back(b, child);
  }
  // sentencepiece's PrefixMatcher reads at most 64 matches at a position (more is undefined
  // behaviour there): count the USER_DEFINED pieces along every piece's path.
  for (int32_t id : normal_ids) {
    if (pieces[id].type != PieceType::kUserDefined) continue;
    uint32_t node = 0, prefixes = 0;
    for (char ch : t->text[id]) {
      node = children[node].at(static_cast<uint8_t>(ch));
      prefixes += node_id[node] >= 0;
    }
    if (prefixes > kMaxUserDefinedPrefixes)
      return unsupported(fmt::format("USER_DEFINED piece {} has more than {} USER_DEFINED prefixes", id,
                                     kMaxUserDefinedPrefixes));
  }

  // Neighbours of each character inside merge targets; UNUSED pieces a merge could produce.
  struct Neighbours {
    bool many = false;
    std::vector<uint32_t> cps;
    void add(uint32_t cp) {
      if (many || std::find(cps.begin(), cps.end(), cp) != cps.end()) return;
      if (cps.size() == kMaxNeighbours) {
        many = true;
        cps = {};
      } else {
        cps.push_back(cp);
      }
    }
  };
  std::vector<Neighbours> before_bmp(0x10000), after_bmp(0x10000);
  std::unordered_map<uint32_t, Neighbours> before_other, after_other;
  auto at = [](std::vector<Neighbours>& bmp, std::unordered_map<uint32_t, Neighbours>& other,
               uint32_t cp) -> Neighbours& { return cp < 0x10000 ? bmp[cp] : other[cp]; };
  std::vector<uint32_t> cps;
  for (int32_t id : normal_ids) {
    const std::string_view s = t->text[id];
    if (!decode_piece(s, cps)) return unsupported(fmt::format("piece {} is not valid UTF-8", id));
    for (size_t j = 1; j < cps.size(); ++j) {
      at(before_bmp, before_other, cps[j]).add(cps[j - 1]);
      at(after_bmp, after_other, cps[j - 1]).add(cps[j]);
    }
    if (pieces[id].type == PieceType::kUnused && cps.size() > 1) {
      // sentencepiece re-splits a merged UNUSED piece by its last-recorded merge, a choice
      // that depends on the whole text: refuse when a merge could produce one.
      size_t off = 0;
      for (size_t j = 0; j + 1 < cps.size(); ++j) {
        off += utf8_len(static_cast<uint8_t>(s[off]));
        const std::string_view left = s.substr(0, off), right = s.substr(off);
        auto formable = [&](std::string_view x) {
          return x.size() == utf8_len(static_cast<uint8_t>(x[0])) || t->find_merge_target(x) >= 0;
        };
        if (formable(left) && formable(right))
          return unsupported(fmt::format("UNUSED piece {} can be produced by a merge", id));
      }
    }
  }
  auto entry = [&](Neighbours& nb) -> uint32_t {
    if (nb.many) return Tables::kMany;
    if (nb.cps.empty()) return 0;
    if (t->lists.size() + 1 >= Tables::kMany) return Tables::kMany;  // out of indices: never cut there
    t->lists.emplace_back(static_cast<uint32_t>(t->list_pool.size()), static_cast<uint32_t>(nb.cps.size()));
    t->list_pool.insert(t->list_pool.end(), nb.cps.begin(), nb.cps.end());
    return static_cast<uint32_t>(t->lists.size());
  };
  t->before_bmp.resize(0x10000);
  t->after_bmp.resize(0x10000);
  for (uint32_t cp = 0; cp < 0x10000; ++cp) {
    t->before_bmp[cp] = static_cast<uint16_t>(entry(before_bmp[cp]));
    t->after_bmp[cp] = static_cast<uint16_t>(entry(after_bmp[cp]));
  }
  for (auto& [cp, nb] : before_other) t->before_other[cp] = entry(nb);
  for (auto& [cp, nb] : after_other) t->after_other[cp] = entry(nb);
  for (uint32_t a = 0; a < 128; ++a) {
    for (uint32_t b = 0; b < 128; ++b) {
      const uint32_t bit = a * 128 + b;
      if (t->boundary_safe(a == ' ' ? kSpaceSymbol : a, b == ' ' ? kSpaceSymbol : b))
        t->ascii_safe[bit >> 6] |= uint64_t{1} << (bit & 63);
    }
  }
  return std::unique_ptr<const BpeEncoder>(new BpeEncoder(std::move(t)));
}

void BpeEncoder::encode(std::string_view text, Scratch& s, std::vector<int32_t>& out) const {
  const Tables& t = *t_;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  if (n == 0) return;
  size_t start = 0, i = utf8_len(p[0]);
  uint32_t prev = p[0] < 0x80 ? p[0] : utf8_decode(p, i);  // the previous character, raw (' ' not yet "▁")
  while (i < n) {
    const uint8_t c = p[i];
    bool cut;
    uint32_t cp;
    size_t len;
    if (c < 0x80 && prev < 0x80) {
      cp = c, len = 1;
      cut = t.ascii_boundary_safe(static_cast<uint8_t>(prev), c);
    } else {
      len = utf8_len(c);
      cp = utf8_decode(p + i, len);
      cut = t.boundary_safe(prev == ' ' ? kSpaceSymbol : prev, cp == ' ' ? kSpaceSymbol : cp);
    }
    if (cut) {
      encode_chunk(text.substr(start, i - start), s, out);
      start = i;
    }
    prev = cp;
    i += len;
  }
  encode_chunk(text.substr(start), s, out);
}

int32_t BpeEncoder::find_piece(const char* p, size_t n, float* score) const {
  const Tables& t = *t_;
  const uint8_t b0 = static_cast<uint8_t>(p[0]), b1 = static_cast<uint8_t>(p[1]);
  const Tables::Direct* d = nullptr;
  if (n == 2 && (b0 | b1) < 0x80) {
    d = &t.ascii_pairs[b0 * 128 + b1];
  } else if (n == 4 && (load32(p) & 0xFFFFFF) == 0x8196E2 && static_cast<uint8_t>(p[3]) < 0x80) {
    d = &t.space_ascii[static_cast<uint8_t>(p[3])];  // "▁" + an ASCII character
  }
  if (d) {
    *score = d->score;
    return d->id;
  }
  if (n <= 8) {
    const ShortPieceTable::Slot* slot = t.short_pieces.find_padded(p, n);
    if (!slot) return -1;
    *score = slot->score;
    return slot->id;
  }
  if (n > t.max_piece) return -1;
  const int32_t id = t.long_pieces.find(p, n, t.text);
  if (id >= 0) *score = t.score[id];
  return id;
}

void BpeEncoder::encode_chunk(std::string_view raw, Scratch& s, std::vector<int32_t>& out) const {
  Scratch::CacheEntry* set = nullptr;
  uint64_t h = 0;
  if (!s.cache.empty() && raw.size() <= Scratch::kCacheKeyMax) {
    h = hash_bytes(raw.data(), raw.size());
    set = &s.cache[(h & (s.cache.size() / Scratch::kCacheWays - 1)) * Scratch::kCacheWays];
    for (size_t way = 0; way < Scratch::kCacheWays; ++way) {
      const Scratch::CacheEntry& e = set[way];
      if (e.hash == h && e.key_len == raw.size() && std::memcmp(e.key, raw.data(), raw.size()) == 0) {
        out.insert(out.end(), e.ids, e.ids + e.n_ids);
        std::rotate(set, set + way, set + way + 1);  // most recently used first
        return;
      }
    }
  }
  s.norm.resize(raw.size() * kSpaceSymbolUtf8.size() + 8);
  char* w = s.norm.data();
  for (char c : raw) {
    if (c == ' ') {
      std::memcpy(w, kSpaceSymbolUtf8.data(), kSpaceSymbolUtf8.size());
      w += kSpaceSymbolUtf8.size();
    } else {
      *w++ = c;
    }
  }
  std::memset(w, 0, 8);
  s.norm.resize(static_cast<size_t>(w - s.norm.data()) + 8);
  const size_t out_begin = out.size();
  bpe(s, out);
  const size_t n_ids = out.size() - out_begin;
  if (set && n_ids <= Scratch::kCacheIdsMax) {
    std::rotate(set, set + Scratch::kCacheWays - 1, set + Scratch::kCacheWays);  // evict the last
    Scratch::CacheEntry* entry = set;
    entry->hash = h;
    entry->key_len = static_cast<uint8_t>(raw.size());
    entry->n_ids = static_cast<uint8_t>(n_ids);
    std::memcpy(entry->key, raw.data(), raw.size());
    std::copy(out.begin() + static_cast<ptrdiff_t>(out_begin), out.end(), entry->ids);
  }
}

// sentencepiece's bpe::Model::Encode on s.norm, then SentencePieceProcessor's id mapping.
void BpeEncoder::bpe(Scratch& s, std::vector<int32_t>& out) const {
  using Symbol = Scratch::Symbol;
  using Candidate = Scratch::Candidate;
  const Tables& t = *t_;
  const std::string_view norm = std::string_view(s.norm).substr(0, s.norm.size() - 8);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(norm.data());
  // Characters, or the longest USER_DEFINED match at a position (frozen). Sized once to the
  // number of characters (no reallocation peak on a long chunk); the vectors only grow.
  size_t n_chars = 0;
  for (uint8_t b : norm) n_chars += (b & 0xC0) != 0x80;
  if (s.syms.size() < n_chars) s.syms.resize(n_chars);
  if (s.heap.capacity() < n_chars) s.heap.reserve(n_chars);
  int32_t n_syms = 0;
  for (size_t pos = 0; pos < norm.size(); ++n_syms) {
    Symbol& sym = s.syms[n_syms];
    sym = {static_cast<uint32_t>(pos), n_syms - 1, n_syms + 1, -1};
    size_t len = utf8_len(bytes[pos]);
    if (t.ud_first[bytes[pos]]) {
      uint32_t node = 0;
      for (size_t k = pos; k < norm.size(); ++k) {
        const Tables::TrieNode& nd = t.trie[node];
        const auto* e = t.trie_edges.data() + nd.edge_begin;
        const auto* e_end = e + nd.edge_count;
        while (e != e_end && e->first != bytes[k]) ++e;
        if (e == e_end) break;
        node = e->second;
        if (t.trie[node].id >= 0) {
          len = k + 1 - pos;
          sym.id = t.trie[node].id | Scratch::kFrozen;
        }
      }
    }
    pos += len;
  }
  if (n_syms == 0) return;
  Symbol* syms = s.syms.data();
  syms[n_syms - 1].next = -1;
  auto end_of = [&](const Symbol& sym) {
    return sym.next >= 0 ? syms[sym.next].begin : static_cast<uint32_t>(norm.size());
  };
  auto frozen = [](const Symbol& sym) { return sym.id >= 0 && (sym.id & Scratch::kFrozen); };

  auto& heap = s.heap;
  heap.clear();
  // sentencepiece's SymbolPairComparator: the best score first, then the leftmost. Candidates
  // that compare equal are never both valid (a pair only grows), so their order does not matter.
  auto less = [](const Candidate& a, const Candidate& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  auto find_pair = [&](int32_t left) {
    const Symbol& l = syms[left];
    const Symbol& r = syms[l.next];
    if (frozen(l) || frozen(r)) return;
    const uint32_t size = end_of(r) - l.begin;
    float score;
    const int32_t id = find_piece(norm.data() + l.begin, size, &score);
    if (id >= 0) heap.push_back({score, static_cast<uint32_t>(left), static_cast<uint32_t>(id) | size << 22});
  };
  auto add_pair = [&](int32_t left) {
    const size_t n = heap.size();
    find_pair(left);
    if (heap.size() != n) std::push_heap(heap.begin(), heap.end(), less);
  };
  for (int32_t i = 0; i + 1 < n_syms; ++i) find_pair(i);
  std::make_heap(heap.begin(), heap.end(), less);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), less);
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& l = syms[c.left];
    // Stale when the left symbol was merged away, or either side has grown since.
    if (l.begin == Scratch::kDead || l.next < 0) continue;
    Symbol& r = syms[l.next];
    if (end_of(r) - l.begin != c.id_size >> 22) continue;
    l.id = static_cast<int32_t>(c.id_size & ((1u << 22) - 1));
    r.begin = Scratch::kDead;
    l.next = r.next;
    if (l.next >= 0) syms[l.next].prev = static_cast<int32_t>(c.left);
    if (l.prev >= 0) add_pair(l.prev);
    if (l.next >= 0) add_pair(static_cast<int32_t>(c.left));
  }

  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    const Symbol& sym = syms[i];
    const uint32_t len = end_of(sym) - sym.begin;
    int32_t id = sym.id >= 0 ? sym.id & ~Scratch::kFrozen : -1;
    float score;
    if (id < 0) id = find_piece(norm.data() + sym.begin, len, &score);
    if (id >= 0) {
      id = t.final_id(id);
    } else {
      id = t.reserved.find(norm.data() + sym.begin, len, t.text);
      if (id < 0) id = t.unk_id;
    }
    if (id == t.unk_id && t.byte_fallback) {
      for (uint32_t k = 0; k < len; ++k) out.push_back(t.byte_id[bytes[sym.begin + k]]);
    } else {
      out.push_back(id);
    }
  }
}

}  // namespace gemma3
