// Tests for examples/llama/tokenizer.hpp (byte-level BPE, SmolLM2 configuration):
//   * a hand-made vocabulary with hand-computed merges (always runs);
//   * with the SmolLM2-135M-Instruct GGUF present: token ids identical to the Hugging Face
//     `tokenizers` reference stored in tests/data/tokenizer_expected.json (written by
//     tests/tokenizer_reference.py), decode(encode(s)) == s byte-exact, and encode speed.
// The model is read from $DELTAKV_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf at the
// repository root; without it those cases print a note and pass.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ios>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "deltakv/io/gguf.hpp"
#include "llama/tokenizer.hpp"

using llama::Tokenizer;

namespace {

// ---- the model's vocabulary, via deltakv::io::GgufFile ---------------------------------------

struct GgufVocab {
  std::string model, pre;
  std::vector<std::string> tokens, merges;
  std::vector<std::int32_t> token_types;
};

GgufVocab read_vocab(const std::string& path) {
  const auto f = deltakv::io::GgufFile::open(path);
  auto str = [&](const char* key) { return f.has(key) ? f.get_string(key) : std::string(); };
  GgufVocab v;
  v.model = str("tokenizer.ggml.model");
  v.pre = str("tokenizer.ggml.pre");
  if (v.model != "gpt2") return v;  // not a GPT-2 style vocabulary: the caller skips
  v.tokens = f.get_string_array("tokenizer.ggml.tokens");
  v.merges = f.get_string_array("tokenizer.ggml.merges");
  if (f.has("tokenizer.ggml.token_type"))
    for (const std::int64_t t : f.get_int_array("tokenizer.ggml.token_type"))
      v.token_types.push_back(static_cast<std::int32_t>(t));
  return v;
}

std::string model_path() {
  if (const char* env = std::getenv("DELTAKV_MODEL"); env && *env) return env;
  return DELTAKV_TEST_DATA_DIR "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// The model's vocabulary, read once; nullptr (with the reason in `why`) when unavailable.
const GgufVocab* smollm2_vocab(std::string& why) {
  static std::string reason;
  static const std::unique_ptr<GgufVocab> vocab = []() -> std::unique_ptr<GgufVocab> {
    const std::string path = model_path();
    if (!std::filesystem::exists(path)) {
      reason = "model not found at " + path + " (set DELTAKV_MODEL)";
      return nullptr;
    }
    auto v = std::make_unique<GgufVocab>(read_vocab(path));
    if (v->model != "gpt2" || v->pre != "smollm" || v->tokens.size() != 49152) {
      reason = path + " is not SmolLM2's vocabulary (model '" + v->model + "', pre '" + v->pre +
               "', " + std::to_string(v->tokens.size()) + " tokens)";
      return nullptr;
    }
    return v;
  }();
  why = reason;
  return vocab.get();
}

const Tokenizer* smollm2(std::string& why) {
  static const std::unique_ptr<Tokenizer> tok = [&]() -> std::unique_ptr<Tokenizer> {
    std::string r;
    const GgufVocab* v = smollm2_vocab(r);
    if (!v) return nullptr;
    return std::make_unique<Tokenizer>(v->tokens, v->merges, v->token_types);
  }();
  if (!tok) smollm2_vocab(why);
  return tok.get();
}

nlohmann::json expected_json() {
  std::ifstream f(DELTAKV_TEST_DATA_DIR "/tokenizer_expected.json", std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "missing tests/data/tokenizer_expected.json");
  return nlohmann::json::parse(f);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::string show(const std::string& s) {  // for failure messages: printable ASCII + escapes
  std::string o;
  for (const unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F) o += char(c);
    else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      o += buf;
    }
  }
  return o.size() > 120 ? o.substr(0, 120) + "..." : o;
}

}  // namespace

TEST_CASE("tokenizer: hand-made vocabulary and merges") {
  // Byte-level strings: ' ' is written 'Ġ' (U+0120), '\n' 'Ċ' (U+010A).
  const std::string G = "\xC4\xA0", NL = "\xC4\x8A";
  const std::vector<std::string> tokens = {
      "<|end|>",                                                          // 0 (control)
      "a", "b", "c", "l", "o", "h", "e", "1", "2", G, NL, "'", "s",         // 1..13
      "bc", "ab", "aa", "he", "ll", "llo", "hello", G + "h", G + "hello",  // 14..22
      "12", G + G, "'s",                                                  // 23..25
  };
  std::vector<std::int32_t> types(tokens.size(), 1);
  types[0] = 3;
  const std::vector<std::string> merges = {
      "b c",         // rank 0: beats "a b" although "a b" is further left
      "a b",         // 1
      "a a",         // 2
      "h e",         // 3
      "l l",         // 4
      "ll o",        // 5
      "he llo",      // 6
      G + " h",      // 7
      G + " hello",  // 8
      "1 2",         // 9
      G + " " + G,   // 10
      "' s",         // 11
  };
  const Tokenizer tok(tokens, merges, types);
  CHECK(tok.vocab_size() == 26);
  using V = std::vector<std::int32_t>;

  // "abc": pairs (a,b) rank 1 and (b,c) rank 0 -> b+c first -> [a, bc]; (a, bc) has no merge.
  CHECK(tok.encode("abc") == V{1, 14});
  // "abab": (a,b) at 0 and 2, (b,a) none -> [ab, ab]
  CHECK(tok.encode("abab") == V{15, 15});
  // "aaa": (a,a) at 0 and 1 with equal rank -> leftmost first -> [aa, a]
  CHECK(tok.encode("aaa") == V{16, 1});
  // "hello": h e l l o -> he l l o -> he ll o -> he llo -> hello
  CHECK(tok.encode("hello") == V{20});
  // " hello" is one word Ġ h e l l o: h+e (3) fires before Ġ+h (7), so Ġh never forms; then
  // ll, llo, hello, and Ġ+hello (8) -> [Ġhello]
  CHECK(tok.encode(" hello") == V{22});
  // " he": Ġ h e -> h+e (3) -> Ġ he, no merge for (Ġ, he) -> [Ġ, he]
  CHECK(tok.encode(" he") == V{10, 17});
  // " h": Ġ+h (7) -> [Ġh]
  CHECK(tok.encode(" h") == V{21});
  CHECK(tok.encode("hello hello") == V{20, 22});
  // digits are always single pieces, so the "1 2" merge never applies
  CHECK(tok.encode("12") == V{8, 9});
  // "a  b": words "a", " " (a space run less its last), " b"; (Ġ, b) has no merge
  CHECK(tok.encode("a  b") == V{1, 10, 10, 2});
  // "a   " at the end: the whole run is one word: Ġ Ġ Ġ -> leftmost Ġ+Ġ -> [ĠĠ, Ġ]
  CHECK(tok.encode("a   ") == V{1, 24, 10});
  // a space run before a digit ends its piece, so it is kept whole too: "a", "  ", "1"
  CHECK(tok.encode("a  1") == V{1, 24, 8});
  // contractions: "'s" is a word of its own; a lone "'" otherwise
  CHECK(tok.encode("a's") == V{1, 25});
  CHECK(tok.encode("'a") == V{12, 1});
  // control token matched literally, around and between ordinary text: "ab" <|end|> "\n" "c" ...
  CHECK(tok.encode("ab<|end|>\nc<|end|><|end|>") == V{15, 0, 11, 3, 0, 0});
  // ordinary encoding ignores it; bytes with no token ('<', '|', 'n', 'd', '>') are dropped
  CHECK(tok.encode_ordinary("<|end|>") == V{7});
  CHECK(tok.encode("<|end") == V{7});
  CHECK(tok.encode("") == V{});
  CHECK(tok.is_special(0));
  CHECK_FALSE(tok.is_special(1));

  // decoding
  CHECK(tok.decode(V{15, 0, 11, 3, 0}) == "ab<|end|>\nc<|end|>");
  CHECK(tok.token_text(10) == " ");
  CHECK(tok.token_text(11) == "\n");
  CHECK(tok.token_text(24) == "  ");
  CHECK(tok.token_text(22) == " hello");
  CHECK(tok.decode(tok.encode("hello hello\n\n  aab'sc 12")) == "hello hello\n\n  aab'sc 12");
  CHECK_THROWS_AS((void)tok.token_text(-1), std::out_of_range);
  CHECK_THROWS_AS((void)tok.decode(V{0, 26}), std::out_of_range);

  // malformed vocabularies
  CHECK_THROWS_AS(Tokenizer(tokens, {"ab"}, types), deltakv::FormatError);          // not "a b"
  CHECK_THROWS_AS(Tokenizer(tokens, {G + "h ello"}, types), deltakv::FormatError);  // no "ello"
  CHECK_THROWS_AS(Tokenizer(tokens, {"c a"}, types), deltakv::FormatError);         // no "ca"
  CHECK_THROWS_AS(Tokenizer(tokens, merges, {1, 1}), deltakv::FormatError);
  CHECK_THROWS_AS(Tokenizer({}, {}), deltakv::FormatError);
}

TEST_CASE("tokenizer: letter / number / space classes") {
  using namespace llama::tokenizer_detail;
  const std::pair<char32_t, CharClass> cases[] = {
      {U'a', kLetter},      {U'Z', kLetter},      {U'5', kNumber},      {U'_', kOther},
      {U'\t', kSpace},      {U'\x1C', kOther},    {U'\x85', kSpace},    {U'\xA0', kSpace},
      {U'é', kLetter},      {U'ß', kLetter},      {U'Æ', kLetter},      {U'×', kOther},
      {U'ª', kLetter},      {U'²', kNumber},      {U'½', kNumber},      {U'·', kOther},
      {U'Ω', kLetter},      {U'ά', kLetter},      {U'Ж', kLetter},      {U'ё', kLetter},
      {U'א', kLetter},      {U'م', kLetter},      {U'٣', kNumber},      {U'۹', kNumber},
      {U'न', kLetter},      {U'\u094D', kOther},  {U'७', kNumber},      {U'ก', kLetter},
      {U'中', kLetter},     {U'、', kOther},      {U'\u3000', kSpace},  {U'ひ', kLetter},
      {U'カ', kLetter},     {U'ー', kLetter},     {U'한', kLetter},     {U'①', kNumber},
      {U'Ⅻ', kNumber},      {U'０', kNumber},     {U'Ａ', kLetter},     {U'\u0301', kOther},
      {U'\u200B', kOther},  {U'\u2028', kSpace},  {U'€', kOther},       {U'🦀', kOther},
      {U'𝐀', kLetter},      {U'𝟎', kNumber},      {U'𠀀', kLetter},     {U'\U0010FFFF', kOther},
  };
  for (const auto& kv : cases)  // (no structured binding: clang 14 cannot capture one)
    CHECK_MESSAGE(classify(kv.first) == kv.second, "U+" << std::hex << std::uint32_t(kv.first));
}

TEST_CASE("tokenizer: SmolLM2 ids match the Hugging Face reference") {
  std::string why;
  const Tokenizer* tok = smollm2(why);
  if (!tok) {
    MESSAGE("skipping SmolLM2 tokenizer comparison: " << why);
    return;
  }
  const nlohmann::json ref = expected_json();
  int identical = 0, total = 0;
  for (const auto& c : ref.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    const auto want = c.at("ids").get<std::vector<std::int32_t>>();
    const auto got = tok->encode(text);
    ++total;
    identical += got == want;
    CHECK_MESSAGE(got == want, "ids differ for \"" << show(text) << "\"");
    if (c.value("round_trip", true))
      CHECK_MESSAGE(tok->decode(got) == text, "round trip differs for \"" << show(text) << "\"");
  }
  MESSAGE(identical << "/" << total << " reference cases identical");

  const auto& g = ref.at("gpl3_prefix");
  const std::string path = g.at("path").get<std::string>();
  const std::string gpl = read_file(path);
  const auto nbytes = g.at("bytes").get<std::size_t>();
  if (gpl.size() < nbytes) {
    MESSAGE("skipping GPL-3 prefix comparison: " << path << " not found");
  } else {
    CHECK(tok->encode(std::string_view(gpl).substr(0, nbytes)) ==
          g.at("ids").get<std::vector<std::int32_t>>());
  }

  // A few ids whose meaning is fixed by the model (bos 1, eos 2).
  CHECK(tok->token_text(1) == "<|im_start|>");
  CHECK(tok->token_text(2) == "<|im_end|>");
  CHECK(tok->is_special(2));
  CHECK(tok->encode("<|im_end|>") == std::vector<std::int32_t>{2});
  CHECK(tok->encode_ordinary("<|im_end|>").size() > 1);
}

TEST_CASE("tokenizer: SmolLM2 round trips and speed") {
  std::string why;
  const GgufVocab* v = smollm2_vocab(why);
  if (!v) {
    MESSAGE("skipping SmolLM2 tokenizer round trips: " << why);
    return;
  }
  // A fresh tokenizer, so the timing below starts from an empty word cache.
  const Tokenizer tok(v->tokens, v->merges, v->token_types);

  const std::string gpl = read_file("/usr/share/common-licenses/GPL-3");
  if (gpl.empty()) {
    MESSAGE("skipping GPL-3 round trip: /usr/share/common-licenses/GPL-3 not found");
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    const auto ids = tok.encode(gpl);
    const double cold = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto t1 = std::chrono::steady_clock::now();
    const auto ids2 = tok.encode(gpl);
    const double warm = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    MESSAGE("GPL-3: " << gpl.size() << " bytes -> " << ids.size() << " tokens; encode "
                      << cold * 1e3 << " ms cold cache, " << warm * 1e3 << " ms warm");
    CHECK(ids == ids2);
    CHECK(tok.decode(ids) == gpl);
    CHECK(cold < 1.0);
  }

  // Bytes that are not UTF-8, lone continuation bytes, truncated sequences, NUL, controls.
  const std::string odd[] = {
      "\x80 abc \xC3",           // lone continuation byte, truncated sequence
      std::string("x\0y\x01\x1F\x7F", 6),
      "\xE2\x82",                // truncated euro sign
      "\xED\xA0\x80",            // an encoded surrogate
      "\xF4\x90\x80\x80 z",      // > U+10FFFF
      "\xE0\x80\xAF",            // overlong '/'
      std::string(3000, ' ') + "x" + std::string(2000, 'a') + std::string(100, '\n'),
      "<|im_start|<|im_start|>>",
  };
  for (const std::string& s : odd)
    CHECK_MESSAGE(tok.decode(tok.encode(s)) == s, "round trip differs for \"" << show(s) << "\"");
  // Bytes without a token in this vocabulary are dropped (as the reference does).
  // ("a\x04b" is three words "a", "\x04", "b"; the middle one vanishes.)
  CHECK(tok.encode("a\x04" "b") == std::vector<std::int32_t>{tok.encode("a")[0], tok.encode("b")[0]});
  CHECK(tok.encode("\xFF\xFE\xC0").empty());

  // encode is safe to call concurrently (shared word cache).
  if (!gpl.empty()) {
    const auto want = tok.encode(gpl);
    std::vector<std::thread> threads;
    std::vector<int> ok(4, 0);
    for (int t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        const Tokenizer copy = tok;  // copies share the (locked) word cache
        ok[t] = copy.encode(gpl) == want;
      });
    for (auto& th : threads) th.join();
    for (int t = 0; t < 4; ++t) CHECK(ok[t] == 1);
  }
}
