// Host harness for sparsegpt.cu's tests (sparsegpt.rs): runs a kernel under src/cuda_emu.h on the block in
// argv[1] and writes its results to argv[2]. Input, little-endian: i32 rows, count, a, b; f32 wb (rows × count),
// u (count × count); for the sweep (a, b = nm_n, nm_m) then u8 mask (rows × count). Output: f32 q, err (rows ×
// count each). With argv[3] = "mask", sparsegpt_block_mask with k = a instead: output u8 mask (rows × count).
// Two warps: the per-warp histograms are summed.
#define MASK_THREADS 64
#include "../cuda_emu.h"
#include "sparsegpt.cu"

#include <cstdint>
#include <string>

int main(int argc, char** argv) {
    if (argc != 3 && argc != 4) return 2;
    const bool choose = argc == 4 && std::string(argv[3]) == "mask";
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 3;
    auto head = emu_read<int32_t>(in, 4);
    size_t rows = head[0], count = head[1];
    auto wb = emu_read<float>(in, rows * count), u = emu_read<float>(in, count * count);
    std::vector<unsigned char> mask(rows * count);
    if (!choose) mask = emu_read<unsigned char>(in, rows * count);
    fclose(in);
    FILE* out = fopen(argv[2], "wb");
    if (!out) return 4;
    if (choose) {
        emu_launch(1, MASK_THREADS, sparsegpt_block_mask, (const float*)wb.data(), (const float*)u.data(), (int)rows,
                   (int)count, (unsigned)head[2], mask.data());
        emu_write(out, mask);
    } else {
        std::vector<float> q(rows * count), err(rows * count);
        emu_launch(rows, THREADS, sparsegpt_sweep, (const float*)wb.data(), (const float*)u.data(),
                   (const unsigned char*)mask.data(), (int)rows, (int)count, head[2], head[3], q.data(), err.data());
        emu_write(out, q);
        emu_write(out, err);
    }
    fclose(out);
    return 0;
}
