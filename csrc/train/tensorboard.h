#pragma once
// TensorBoard event files (log.tensorboard, docs/training.md): scalars and
// images appended to <dir>/events.out.tfevents.<seconds>.<host>.moeyard as
// TFRecords (length, its masked CRC-32C, an Event protobuf, its masked
// CRC-32C), written without TensorFlow or protobuf and flushed after each
// step. metrics.jsonl stays the record of a run; this is a view of it.

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace moeyard::train {

class EventWriter {
 public:
  // Creates `dir` and a new event file in it (errors name the path).
  explicit EventWriter(const std::string& dir);

  void scalar(const std::string& tag, double value, int64_t step);
  // A PNG image of height x width pixels.
  void image(
      const std::string& tag,
      const std::string& png,
      int64_t height,
      int64_t width,
      int64_t step);
  void flush();
  const std::string& path() const {
    return path_;
  }

 private:
  void record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

// A grayscale PNG of `cells` (rows of equal length, values in [0, 1]: black
// to white), each cell `scale` x `scale` pixels; height and width into the
// pointers.
std::string png_heatmap(
    const std::vector<std::vector<double>>& cells,
    int64_t scale,
    int64_t* height,
    int64_t* width);

// CRC-32C (Castagnoli) of `data`, as TFRecords use it (before masking).
uint32_t crc32c(const std::string& data);

} // namespace moeyard::train
