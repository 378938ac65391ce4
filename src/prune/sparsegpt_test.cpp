// Host harness for sparsegpt.cu's tests (sparsegpt.rs): runs the kernel under src/cuda_emu.h on the block in
// argv[1] and writes its results to argv[2]. Input, little-endian: i32 rows, count, nm_n, nm_m; f32 wb
// (rows × count), u (count × count); u8 mask (rows × count). Output: f32 q, err (rows × count each).
#include "../cuda_emu.h"
#include "sparsegpt.cu"

#include <cstdint>

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 3;
    auto head = emu_read<int32_t>(in, 4);
    size_t rows = head[0], count = head[1];
    auto wb = emu_read<float>(in, rows * count), u = emu_read<float>(in, count * count);
    auto mask = emu_read<unsigned char>(in, rows * count);
    fclose(in);
    std::vector<float> q(rows * count), err(rows * count);
    emu_launch(rows, THREADS, sparsegpt_sweep, (const float*)wb.data(), (const float*)u.data(),
               (const unsigned char*)mask.data(), (int)rows, (int)count, head[2], head[3], q.data(), err.data());
    FILE* out = fopen(argv[2], "wb");
    if (!out) return 4;
    emu_write(out, q);
    emu_write(out, err);
    fclose(out);
    return 0;
}
