// Runs the fused CI kernels (server/src/cuda/ci_kernels.cu, included unchanged) under the CPU
// emulation of emu.h and checks each against plain loops: dense output, per-component sums and
// firing counts, the compacted entries (as a set, since blocks append in any order), the count when
// the buffer is too small, padding rows. Launch shapes are those of server/src/cuda/mod.rs.
// Prints one line per case; exits 1 on the first mismatch.
#include "emu.h"

#include "../../src/cuda/ci_kernels.cu"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>

using Entry = std::array<uint32_t, 4>;

static int failures = 0;

static void check(bool ok, const std::string& what) {
    if (!ok) {
        std::printf("MISMATCH: %s\n", what.c_str());
        ++failures;
    }
}

static float as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// bias (+ exact GELU if `gelu`) on a grid of (columns / 256 rounded up) × row_blocks, as mod.rs
// launches it; `vec4`: the float4 kernel (h a multiple of 4).
static void bias_act_case(uint32_t rows, uint32_t h, uint32_t group_rows, uint32_t row_blocks,
                          bool gelu, bool vec4) {
    std::mt19937 rng(rows * 31 + h);
    std::normal_distribution<float> nd(0.0f, 2.0f);
    std::vector<float> x(rows * h), bias((rows / group_rows + 1) * h), out(rows * h, NAN);
    for (auto& v : x) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    if (vec4) {
        check(h % 4 == 0, "bias_act_f32x4 needs h % 4 == 0");
        emu_launch((h / 4 + 255) / 256, row_blocks, 256, [&] {
            bias_act_f32x4(reinterpret_cast<const float4*>(x.data()),
                           reinterpret_cast<const float4*>(bias.data()),
                           reinterpret_cast<float4*>(out.data()), rows, h / 4, group_rows, gelu);
        });
    } else {
        emu_launch((h + 255) / 256, row_blocks, 256, [&] {
            bias_act_f32(x.data(), bias.data(), out.data(), rows, h, group_rows, gelu);
        });
    }
    double worst = 0;
    for (uint32_t r = 0; r < rows; ++r) {
        for (uint32_t j = 0; j < h; ++j) {
            const double v = (double)x[r * h + j] + bias[(r / group_rows) * h + j];
            const double want = gelu ? 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))) : v;
            worst = std::max(worst, std::abs(want - out[r * h + j]) / std::max(1.0, std::abs(want)));
        }
    }
    std::printf("bias_act%s rows %u h %u group %u row blocks %u gelu %d: max rel err %.1e\n",
                vec4 ? "x4" : "", rows, h, group_rows, row_blocks, (int)gelu, worst);
    check(worst < 1e-5, "bias_act values");
}

// One module's final CI layer: z is [n, c] (transposed: [c, n]); entries appended after `prior`
// entries already counted (as when several modules share the buffer).
static void ci_final_case(uint32_t prompts, uint32_t seq, uint32_t c, bool transposed, int kind,
                          float active, float fire, uint64_t cap, uint64_t prior,
                          uint32_t short_by = 0) {
    const uint32_t n = prompts * seq, col0 = 1000;
    // Prompt p is `p * short_by` tokens short of seq (right padding), down to one token.
    std::vector<uint32_t> lens(prompts);
    for (uint32_t p = 0; p < prompts; ++p) lens[p] = std::max<int64_t>(1, (int64_t)seq - p * short_by);
    std::mt19937 rng(n * 7 + c + kind);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> z(n * c), bias(c);
    for (auto& v : z) v = nd(rng);
    for (auto& v : bias) v = 0.5f * nd(rng);
    const uint32_t row_stride = transposed ? 1 : c, col_stride = transposed ? n : 1;
    std::vector<float> ci(n * c, NAN), sums(c, 0.0f);
    std::vector<uint32_t> fires(c, 0), entries(4 * (cap + prior) + 4, 0xdeadbeefu);
    unsigned long long counter = prior;
    emu_launch((n + FINAL_ROWS - 1) / FINAL_ROWS, (c + FINAL_THREADS - 1) / FINAL_THREADS,
               FINAL_THREADS, [&] {
                   ci_final_f32(z.data(), bias.data(), n, c, row_stride, col_stride, seq,
                                lens.data(), kind,
                                active, fire, col0, ci.data(), 1, sums.data(), fires.data(),
                                entries.data(), cap + prior, &counter);
               });
    // Plain loops.
    std::set<Entry> want;
    double sum_err = 0, ci_err = 0;
    bool fires_ok = true;
    for (uint32_t k = 0; k < c; ++k) {
        double s = 0;
        uint32_t f = 0;
        for (uint32_t r = 0; r < n; ++r) {
            const float v = lower_ci(z[(uint64_t)r * row_stride + (uint64_t)k * col_stride] + bias[k],
                                     kind);
            ci_err = std::max(ci_err, (double)std::abs(v - ci[(uint64_t)r * c + k]));
            if (r % seq >= lens[r / seq]) continue;
            s += v;
            f += v > fire;
            if (v >= active) want.insert({r / seq, r % seq, col0 + k, __float_as_uint(v)});
        }
        sum_err = std::max(sum_err, std::abs(s - sums[k]) / std::max(1.0, std::abs(s)));
        fires_ok &= f == fires[k];
    }
    const uint64_t written = std::min<uint64_t>(want.size(), cap);
    std::set<Entry> got;
    for (uint64_t i = prior; i < prior + written; ++i) {
        got.insert({entries[4 * i], entries[4 * i + 1], entries[4 * i + 2], entries[4 * i + 3]});
    }
    const bool untouched = entries[4 * (prior + written)] == 0xdeadbeefu;
    const bool subset = std::includes(want.begin(), want.end(), got.begin(), got.end());
    std::printf(
        "ci_final %ux%u (short by %u) c %u %s kind %d cap %llu prior %llu: %zu entries (counter "
        "+%llu), %llu written, ci err %.1e, sum err %.1e\n",
        prompts, seq, short_by, c, transposed ? "[c,n]" : "[n,c]", kind, (unsigned long long)cap,
        (unsigned long long)prior, want.size(), counter - prior, (unsigned long long)written,
        ci_err, sum_err);
    check(ci_err == 0, "dense CI equals lower_ci(z + b)");
    check(sum_err < 1e-5, "CI sums");
    check(fires_ok, "firing counts");
    check(counter - prior == want.size(), "counter counts every active entry");
    check(got.size() == written, "written entries are distinct");
    check(subset, "written entries are active entries");
    check(cap < want.size() || got == want, "all entries written when they fit");
    check(untouched, "nothing written past the reserved range or the cap");
}

// LayerNorm of `rows` rows of `d`, launched as mod.rs does (LN_THREADS / 32 rows per block), against
// the biased-variance formula in double.
static void layer_norm_case(uint32_t rows, uint32_t d) {
    std::mt19937 rng(rows * 17 + d);
    std::normal_distribution<float> nd(0.5f, 3.0f);
    std::vector<float> x(rows * d), w(d), b(d), out(rows * d, NAN);
    for (auto& v : x) v = nd(rng);
    for (auto& v : w) v = nd(rng);
    for (auto& v : b) v = nd(rng);
    const uint32_t per = LN_THREADS / 32;
    emu_launch((rows + per - 1) / per, 1, LN_THREADS, [&] {
        layer_norm_f32(x.data(), w.data(), b.data(), out.data(), rows, d, 1e-5f);
    });
    double worst = 0;
    for (uint32_t r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (uint32_t j = 0; j < d; ++j) mean += x[r * d + j];
        mean /= d;
        for (uint32_t j = 0; j < d; ++j) var += (x[r * d + j] - mean) * (x[r * d + j] - mean);
        var /= d;
        for (uint32_t j = 0; j < d; ++j) {
            const double want = (x[r * d + j] - mean) / std::sqrt(var + 1e-5) * w[j] + b[j];
            worst = std::max(worst, std::abs(want - out[r * d + j]) / std::max(1.0, std::abs(want)));
        }
    }
    std::printf("layer_norm %u rows of %u: max rel err %.1e\n", rows, d, worst);
    check(worst < 1e-5, "layer_norm_f32 values");
}

static void probs_final_case(std::vector<uint32_t> lens, uint32_t seq, uint32_t vocab, float thr,
                             uint64_t cap) {
    const uint32_t prompts = (uint32_t)lens.size(), n = prompts * seq;
    std::mt19937 rng(vocab + seq);
    std::normal_distribution<float> nd(0.0f, 3.0f);
    std::vector<float> logits((uint64_t)n * vocab);
    for (auto& v : logits) v = nd(rng);
    std::vector<uint32_t> entries(4 * cap + 4, 0xdeadbeefu);
    unsigned long long counter = 0;
    emu_launch(n, 1, PROB_THREADS, [&] {
        probs_final_f32(logits.data(), n, vocab, seq, lens.data(), thr, entries.data(), cap,
                        &counter);
    });
    // Plain loops in double; entries within 1e-6 of the threshold may fall either side.
    std::set<std::array<uint32_t, 3>> sure, maybe;
    for (uint32_t r = 0; r < n; ++r) {
        if (r % seq >= lens[r / seq]) continue;
        const float* x = &logits[(uint64_t)r * vocab];
        const double m = *std::max_element(x, x + vocab);
        double s = 0;
        for (uint32_t j = 0; j < vocab; ++j) s += std::exp(x[j] - m);
        for (uint32_t j = 0; j < vocab; ++j) {
            const double p = std::exp(x[j] - m) / s;
            if (std::abs(p - thr) <= 1e-6) {
                maybe.insert({r / seq, r % seq, j});
            } else if (p >= thr) {
                sure.insert({r / seq, r % seq, j});
            }
        }
    }
    double p_err = 0;
    std::set<std::array<uint32_t, 3>> got;
    const uint64_t written = std::min<uint64_t>(counter, cap);
    for (uint64_t i = 0; i < written; ++i) {
        const std::array<uint32_t, 3> key = {entries[4 * i], entries[4 * i + 1], entries[4 * i + 2]};
        got.insert(key);
        const float* x = &logits[((uint64_t)key[0] * seq + key[1]) * vocab];
        const double m = *std::max_element(x, x + vocab);
        double s = 0;
        for (uint32_t j = 0; j < vocab; ++j) s += std::exp(x[j] - m);
        p_err = std::max(p_err, std::abs(std::exp(x[key[2]] - m) / s - as_float(entries[4 * i + 3])));
    }
    bool all_known = true;
    for (const auto& k : got) all_known &= sure.count(k) || maybe.count(k);
    bool all_sure = true;
    for (const auto& k : sure) all_sure &= got.count(k) > 0;
    std::printf("probs_final %u prompts x %u vocab %u thr %g cap %llu: %zu entries (+%zu at the "
                "threshold), counter %llu, p err %.1e\n",
                prompts, seq, vocab, thr, (unsigned long long)cap, sure.size(), maybe.size(),
                counter, p_err);
    check(counter >= sure.size() && counter <= sure.size() + maybe.size(), "counter");
    check(got.size() == written, "written output entries are distinct");
    check(all_known, "written output entries are above the threshold, in unpadded rows");
    check(cap < sure.size() || all_sure, "every output entry written when they fit");
    check(p_err < 1e-6, "probabilities");
    check(entries[4 * written] == 0xdeadbeefu, "nothing written past the cap");
}

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line out before a crash, if one comes
    for (bool gelu : {true, false}) {
        // shared_mlp: one bias row, rows strided over 4 row blocks
        bias_act_case(37, 300, 37, 4, gelu, false);
        bias_act_case(37, 300, 37, 4, gelu, true);
        // vector_mlp / mlp: a bias row per component
        bias_act_case(5 * 9, 70, 9, 3, gelu, false);
        bias_act_case(5 * 9, 68, 9, 3, gelu, true);
        // more row blocks than rows; several column blocks
        bias_act_case(3, 600, 3, 8, gelu, false);
        bias_act_case(3, 2048, 3, 8, gelu, true);
        bias_act_case(1, 1, 1, 1, gelu, false);
    }
    for (int kind = 0; kind < 4; ++kind) {
        ci_final_case(3, 100, 300, false, kind, 0.6f, 0.0f, 1 << 20, 0);
    }
    ci_final_case(2, 64, 257, true, SIG_CLAMP, 0.3f, 0.1f, 1 << 20, 5);  // [c, n], after 5 others
    ci_final_case(3, 100, 300, false, SIG_CLAMP, 0.3f, 0.0f, 100, 0);    // overflow: counted only
    ci_final_case(1, 1, 1, false, SIG_LOGISTIC, 0.0f, 0.0f, 4, 0);
    ci_final_case(4, 100, 130, false, SIG_LOGISTIC, 0.5f, 0.2f, 1 << 20, 0, 30);  // padded prompts
    ci_final_case(3, 64, 40, true, SIG_CLAMP, 0.2f, 0.0f, 1 << 20, 0, 63);        // down to 1 token
    ci_final_case(9, 10, 50, false, SIG_CLAMP, 0.2f, 0.0f, 1 << 20, 0, 1);  // many prompts per block
    layer_norm_case(13, 128);  // a partial block of rows
    layer_norm_case(5, 40);    // d not a multiple of 32
    layer_norm_case(3, 512);
    layer_norm_case(1, 1);
    probs_final_case({7, 4, 1}, 7, 1000, 0.004f, 1 << 16);  // two prompts padded
    probs_final_case({5}, 5, 300, 0.01f, 3);                 // overflow
    probs_final_case({3}, 3, 40, 0.0f, 1 << 10);             // everything is an entry
    if (failures) {
        std::printf("%d mismatches\n", failures);
        return 1;
    }
    std::printf("all kernel checks passed\n");
    return 0;
}
