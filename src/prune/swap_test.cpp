// Host harness for swap.cu's tests (swap.rs): runs the kernel under src/cuda_emu.h on the problem in argv[1]
// and writes its results to argv[2]. Input, little-endian: i32 m, n, group, cap; f32 g (n × n), gd (n),
// inv_gd (n), w, r, fr (m × n each). Output: f32 w, fr (m × n each); i32 made (m); f64 flops (m).
#include "../cuda_emu.h"
#include "swap.cu"

#include <cstdint>
#include <cstdio>

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 3;
    auto head = emu_read<int32_t>(in, 4);
    size_t m = head[0], n = head[1];
    auto g = emu_read<float>(in, n * n), gd = emu_read<float>(in, n), inv = emu_read<float>(in, n);
    auto w = emu_read<float>(in, m * n), r = emu_read<float>(in, m * n), fr = emu_read<float>(in, m * n);
    fclose(in);
    std::vector<int> made(m);
    std::vector<double> flops(m);
    emu_launch(m, THREADS, swap_search, (const float*)g.data(), (const float*)gd.data(), (const float*)inv.data(),
               w.data(), r.data(), fr.data(), (int)m, (int)n, head[2], head[3], made.data(), flops.data());
    FILE* out = fopen(argv[2], "wb");
    if (!out) return 4;
    emu_write(out, w);
    emu_write(out, fr);
    emu_write(out, made);
    emu_write(out, flops);
    fclose(out);
    return 0;
}
