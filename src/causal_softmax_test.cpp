// Host harness for causal_softmax.cu's tests (linalg.rs): runs the kernel under src/cuda_emu.h on the input in
// argv[1] and writes its results to argv[2]. Input, little-endian: i32 kind (0 f32, 1 bf16, 2 f16: scores; 3:
// conversions), then for scores i32 rows, t, window, f32 scale, and the scores' bits (rows × t, 4 or 2 bytes
// each); output their probabilities' bits. For conversions: i32 n, u16 f16 bits (n), f32 values (n); output
// f32 widened f16 (n), u16 bf16 and f16 bits of the values (n each).
#include "cuda_emu.h"
#include "causal_softmax.cu"

#include <cstdint>
#include <cstdio>

template <class B>
void softmax(FILE* in, FILE* out, void (*kernel)(const B*, B*, int, int, float)) {
    auto head = emu_read<int32_t>(in, 3);
    float scale = emu_read<float>(in, 1)[0];
    size_t rows = head[0], t = head[1];
    auto s = emu_read<B>(in, rows * t);
    std::vector<B> p(rows * t);
    emu_launch(rows, THREADS, kernel, (const B*)s.data(), p.data(), head[1], head[2], scale);
    emu_write(out, p);
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = fopen(argv[1], "rb");
    FILE* out = fopen(argv[2], "wb");
    if (!in || !out) return 3;
    switch (emu_read<int32_t>(in, 1)[0]) {
        case 0: softmax(in, out, causal_softmax_f32); break;
        case 1: softmax(in, out, causal_softmax_bf16); break;
        case 2: softmax(in, out, causal_softmax_f16); break;
        case 3: {
            size_t n = emu_read<int32_t>(in, 1)[0];
            auto h = emu_read<uint16_t>(in, n);
            auto f = emu_read<float>(in, n);
            std::vector<float> wide(n);
            std::vector<uint16_t> bf(n), hf(n);
            emu_launch(1, 1, convert, (const unsigned short*)h.data(), (const float*)f.data(), (int)n, wide.data(),
                       bf.data(), hf.data());
            emu_write(out, wide);
            emu_write(out, bf);
            emu_write(out, hf);
            break;
        }
        default: return 4;
    }
    fclose(in);
    fclose(out);
    return 0;
}
