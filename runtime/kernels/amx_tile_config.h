// The AMX tile configuration (palette 1) that the AMX paths (int_amx.cc, attention_amx.cc) load with
// _tile_loadconfig: bytes per row and rows of each of the 8 tiles.
#pragma once

#include <cstdint>
#include <cstring>

namespace hadanorm {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];

  TileConfig() {
    std::memset(this, 0, sizeof *this);
    palette_id = 1;
  }
  void set(int tile, int rows_, int bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(rows_);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
};

}  // namespace hadanorm
