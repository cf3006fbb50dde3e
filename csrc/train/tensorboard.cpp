#include "train/tensorboard.h"

#include <c10/util/Exception.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

namespace moeyard::train {
namespace {

// ---- checksums
// ----------------------------------------------------------------

// A reflected CRC-32 table for `poly`.
std::array<uint32_t, 256> crc_table(uint32_t poly) {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) {
      c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
    }
    t[i] = c;
  }
  return t;
}

uint32_t crc(const std::array<uint32_t, 256>& t, const char* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c = t[(c ^ static_cast<uint8_t>(p[i])) & 0xFF] ^ (c >> 8);
  }
  return c ^ 0xFFFFFFFFu;
}

// PNG chunks use the ISO-HDLC CRC-32 (zlib's).
uint32_t crc32_png(const std::string& s) {
  static const auto table = crc_table(0xEDB88320u);
  return crc(table, s.data(), s.size());
}

uint32_t masked(uint32_t c) {
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

// ---- protobuf wire format ---------------------------------------------------

void varint(std::string& s, uint64_t v) {
  while (v >= 0x80) {
    s.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  s.push_back(static_cast<char>(v));
}

void key(std::string& s, int field, int wire) {
  varint(s, (static_cast<uint64_t>(field) << 3) | wire);
}

void bytes_field(std::string& s, int field, const std::string& v) {
  key(s, field, 2);
  varint(s, v.size());
  s += v;
}

template <typename T>
void fixed_field(std::string& s, int field, T v) {
  key(s, field, sizeof(T) == 8 ? 1 : 5);
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T)); // little-endian hosts
  s.append(b, sizeof(T));
}

// Event {wall_time = 1, step = 2, file_version = 3 | summary = 5}.
std::string event(
    int64_t step, const std::string& summary_or_version, bool version) {
  std::string e;
  const double now = std::chrono::duration<double>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
  fixed_field(e, 1, now);
  key(e, 2, 0);
  varint(e, static_cast<uint64_t>(step));
  bytes_field(e, version ? 3 : 5, summary_or_version);
  return e;
}

// Summary {value = 1: Value {tag = 1, simple_value = 2 | image = 4}}.
std::string summary(const std::string& tag, const std::string& value_fields) {
  std::string v;
  bytes_field(v, 1, tag);
  v += value_fields;
  std::string s;
  bytes_field(s, 1, v);
  return s;
}

void be32(std::string& s, uint32_t v) {
  for (int k = 3; k >= 0; --k) {
    s.push_back(static_cast<char>((v >> (8 * k)) & 0xFF));
  }
}

void png_chunk(std::string& png, const char* type, const std::string& data) {
  be32(png, static_cast<uint32_t>(data.size()));
  const std::string body = std::string(type, 4) + data;
  png += body;
  be32(png, crc32_png(body));
}

} // namespace

uint32_t crc32c(const std::string& data) {
  static const auto table = crc_table(0x82F63B78u);
  return crc(table, data.data(), data.size());
}

EventWriter::EventWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "host";
  gethostname(host, sizeof host - 1);
  const auto secs = std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
  path_ = (std::filesystem::path(dir) /
           ("events.out.tfevents." + std::to_string(secs) + "." + host + "." +
            std::to_string(getpid()) + ".moeyard"))
              .string();
  out_.open(path_, std::ios::binary | std::ios::app);
  TORCH_CHECK(out_, "log.tensorboard: cannot write ", path_);
  record(event(0, "brain.Event:2", true));
  flush();
}

void EventWriter::record(const std::string& e) {
  std::string len(8, '\0');
  const uint64_t n = e.size();
  std::memcpy(len.data(), &n, 8);
  const uint32_t len_crc = masked(crc32c(len)), data_crc = masked(crc32c(e));
  out_.write(len.data(), 8);
  out_.write(reinterpret_cast<const char*>(&len_crc), 4);
  out_.write(e.data(), static_cast<std::streamsize>(e.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), 4);
}

void EventWriter::scalar(const std::string& tag, double value, int64_t step) {
  std::string v;
  fixed_field(v, 2, static_cast<float>(value));
  record(event(step, summary(tag, v), false));
}

void EventWriter::image(
    const std::string& tag,
    const std::string& png,
    int64_t height,
    int64_t width,
    int64_t step) {
  // Image {height = 1, width = 2, colorspace = 3, encoded_image_string = 4}
  std::string img;
  key(img, 1, 0);
  varint(img, static_cast<uint64_t>(height));
  key(img, 2, 0);
  varint(img, static_cast<uint64_t>(width));
  key(img, 3, 0);
  varint(img, 1); // grayscale
  bytes_field(img, 4, png);
  std::string v;
  bytes_field(v, 4, img);
  record(event(step, summary(tag, v), false));
}

void EventWriter::flush() {
  out_.flush();
  TORCH_CHECK(out_, "log.tensorboard: writing ", path_, " failed");
}

std::string png_heatmap(
    const std::vector<std::vector<double>>& cells,
    int64_t scale,
    int64_t* height,
    int64_t* width) {
  const int64_t rows = static_cast<int64_t>(cells.size());
  const int64_t cols = rows ? static_cast<int64_t>(cells[0].size()) : 0;
  *height = rows * scale;
  *width = cols * scale;
  // Scanlines: filter byte 0, then one gray byte per pixel.
  std::string raw;
  for (int64_t y = 0; y < *height; ++y) {
    raw.push_back('\0');
    for (int64_t x = 0; x < *width; ++x) {
      const double v = cells[y / scale][x / scale];
      const double c = v < 0 ? 0 : v > 1 ? 1 : v;
      raw.push_back(static_cast<char>(static_cast<uint8_t>(c * 255 + 0.5)));
    }
  }
  // zlib: stored (uncompressed) deflate blocks of up to 65535 bytes, then
  // the Adler-32 of the data.
  std::string z = "\x78\x01";
  size_t at = 0;
  do {
    const size_t n = std::min<size_t>(65535, raw.size() - at);
    z.push_back(at + n == raw.size() ? '\x01' : '\x00');
    z.push_back(static_cast<char>(n & 0xFF));
    z.push_back(static_cast<char>(n >> 8));
    z.push_back(static_cast<char>(~n & 0xFF));
    z.push_back(static_cast<char>((~n >> 8) & 0xFF));
    z.append(raw, at, n);
    at += n;
  } while (at < raw.size());
  uint32_t a = 1, b = 0;
  for (const char ch : raw) {
    a = (a + static_cast<uint8_t>(ch)) % 65521;
    b = (b + a) % 65521;
  }
  be32(z, (b << 16) | a);
  std::string png = "\x89PNG\r\n\x1a\n";
  std::string ihdr;
  be32(ihdr, static_cast<uint32_t>(*width));
  be32(ihdr, static_cast<uint32_t>(*height));
  ihdr += std::string("\x08\x00\x00\x00\x00", 5); // 8-bit gray
  png_chunk(png, "IHDR", ihdr);
  png_chunk(png, "IDAT", z);
  png_chunk(png, "IEND", "");
  return png;
}

} // namespace moeyard::train
