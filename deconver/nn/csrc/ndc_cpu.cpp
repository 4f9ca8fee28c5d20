// Native CPU kernels of the depth-wise NDC update on channels-last float32 tensors.
//
// Notation (deconver/nn/ndc.py): C input channels, SC source channels per channel (G = C groups,
// m = 1), CS = C * SC source channels, filter taps T = kd * kh * kw. Tensors are channels-last:
// memory order (N, D, H, W, channels); a 2D tensor is D = 1, kd = 1. Filters come as tables
// wt[T][CS] of cross-correlation weights (tap t = (a * kh + b) * kw + e reads the input voxel at
// offset (a - kd/2, b - kh/2, e - kw/2)), zero "same" padding.
//
//   K(s)[v, c]           = sum_t sum_j wk[t][c*SC+j] * s[v + t, c*SC+j]      (ndc_k)
//   A(y)[v, c*SC+j]      = sum_t wa[t][c*SC+j] * y[v + t, c]                  (the stencil of the others)
//   gw[t][c*SC+j]        = sum_v g[v, c*SC+j] * y[v + t, c]                   (ndc_filter_grad)
//
// The element-wise work of the update and of its backward is done where each adjoint is computed,
// so the adjoints never exist as tensors. Vectors of 8 floats (GCC/Clang vector extensions: AVX2 or
// AVX-512VL instructions with -march=native, SSE pairs elsewhere) run over the output channels.
// Every entry point returns 0, or -1 for an SC it has no kernel for (1, 2, 4 and 8 are supported;
// the caller then keeps its fallback). Work is split over `threads` threads by rows (n, d, h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{} + x; }

// Sums of adjacent lane pairs of a and b, in order: (a0+a1, a2+a3, a4+a5, a6+a7, b0+b1, ...).
inline v8 pair_sums(v8 a, v8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}

// Sums of SC consecutive lanes of the 8*SC lanes of acc[0..SC): 8 sums, in order.
template <int SC> inline v8 group_sums(const v8* acc) {
    if constexpr (SC == 1) {
        return acc[0];
    } else {
        v8 half[SC / 2];
        for (int i = 0; i < SC / 2; ++i) half[i] = pair_sums(acc[2 * i], acc[2 * i + 1]);
        return group_sums<SC / 2>(half);
    }
}

// Source-channel order. The adjoint kernels accumulate "by j": a[j] holds channels c..c+7 of source
// j (a[j][l] = channel (c + l) * SC + j), which lets the inner loop load y[v + t, c..c+7] as it is;
// to_source_order turns SC such vectors into the tensor's order (vector i, lane l = source channel
// c * SC + 8 * i + l), by_source its inverse. log2(SC) rounds of a perfect shuffle.
template <int SC> inline void to_source_order(const v8* a, v8* out) {
    v8 cur[SC];
    for (int i = 0; i < SC; ++i) cur[i] = a[i];
    for (int step = 1; step < SC; step *= 2) {
        v8 next[SC];
        for (int i = 0; i < SC / 2; ++i) {
            next[2 * i] = __builtin_shufflevector(cur[i], cur[i + SC / 2], 0, 8, 1, 9, 2, 10, 3, 11);
            next[2 * i + 1] = __builtin_shufflevector(cur[i], cur[i + SC / 2], 4, 12, 5, 13, 6, 14, 7, 15);
        }
        for (int i = 0; i < SC; ++i) cur[i] = next[i];
    }
    for (int i = 0; i < SC; ++i) out[i] = cur[i];
}

template <int SC> inline void by_source(const v8* a, v8* out) {
    v8 cur[SC];
    for (int i = 0; i < SC; ++i) cur[i] = a[i];
    for (int step = 1; step < SC; step *= 2) {
        v8 next[SC];
        for (int i = 0; i < SC / 2; ++i) {
            next[i] = __builtin_shufflevector(cur[2 * i], cur[2 * i + 1], 0, 2, 4, 6, 8, 10, 12, 14);
            next[i + SC / 2] = __builtin_shufflevector(cur[2 * i], cur[2 * i + 1], 1, 3, 5, 7, 9, 11, 13, 15);
        }
        for (int i = 0; i < SC; ++i) cur[i] = next[i];
    }
    for (int i = 0; i < SC; ++i) out[i] = cur[i];
}

struct Geo {
    int64_t n, d, h, w, c, kd, kh, kw;
    int64_t rows() const { return n * d * h; }
    int64_t taps() const { return kd * kh * kw; }
};

// The valid taps of one voxel: input offsets in voxels relative to it and tap indices.
struct Taps {
    std::vector<int64_t> off;
    std::vector<int64_t> tap;
    int64_t count = 0;
    explicit Taps(const Geo& g) : off(g.taps()), tap(g.taps()) {}
    void at(const Geo& g, int64_t d, int64_t h, int64_t w) {
        count = 0;
        for (int64_t a = 0; a < g.kd; ++a) {
            int64_t dd = d + a - g.kd / 2;
            if (dd < 0 || dd >= g.d) continue;
            for (int64_t b = 0; b < g.kh; ++b) {
                int64_t hh = h + b - g.kh / 2;
                if (hh < 0 || hh >= g.h) continue;
                for (int64_t e = 0; e < g.kw; ++e) {
                    int64_t ww = w + e - g.kw / 2;
                    if (ww < 0 || ww >= g.w) continue;
                    off[count] = ((dd - d) * g.h + (hh - h)) * g.w + (ww - w);
                    tap[count] = (a * g.kh + b) * g.kw + e;
                    ++count;
                }
            }
        }
    }
};

// The taps of every voxel of one row (n, d, h): the row's inner voxels (away from its ends) share one
// list; the kw - 1 voxels at its ends have their own.
struct RowTaps {
    Taps inner;
    std::vector<Taps> ends;
    int64_t rw, w;
    explicit RowTaps(const Geo& g) : inner(g), ends(2 * (g.kw / 2), Taps(g)), rw(g.kw / 2), w(g.w) {}
    void at(const Geo& g, int64_t r) {
        const int64_t hh = r % g.h, dd = (r / g.h) % g.d;
        if (w > 2 * rw) inner.at(g, dd, hh, rw);
        for (int64_t i = 0; i < rw; ++i) {
            ends[i].at(g, dd, hh, i);
            ends[rw + i].at(g, dd, hh, w - rw + i);
        }
    }
    const Taps& operator[](int64_t x) const {
        if (x < rw) return ends[x];
        if (x >= w - rw) return ends[rw + x - (w - rw)];
        return inner;
    }
};

// Calls body(r, taps) for every row r in [r0, r1) (its voxels are r * W + w, w < W).
template <class Body> void for_rows(const Geo& g, int64_t r0, int64_t r1, Body body) {
    RowTaps taps(g);
    for (int64_t r = r0; r < r1; ++r) {
        taps.at(g, r);
        body(r, taps);
    }
}

// body(r0, r1, thread) on `threads` contiguous row ranges (the calling thread takes the first).
template <class Body> void parallel_rows(const Geo& g, int threads, Body body) {
    int64_t rows = g.rows();
    int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
    std::vector<std::thread> pool;
    for (int i = 1; i < nt; ++i) pool.emplace_back(body, rows * i / nt, rows * (i + 1) / nt, i);
    body(0, rows / nt, 0);
    for (auto& t : pool) t.join();
}

// Calls f.template operator()<B>(c) over c = 0, 8B, 16B, ... while a whole block of B fits in
// `count`, then with B = 1 for the rest (count a multiple of 8): B blocks of 8 channels at a time
// give the inner loops enough independent accumulators to hide the FMA latency.
template <int B, class F> inline void blocks(int64_t count, F f) {
    int64_t c = 0;
    for (; c + 8 * B <= count; c += 8 * B) f.template operator()<B>(c);
    if constexpr (B > 1)
        for (; c < count; c += 8) f.template operator()<1>(c);
}

constexpr int at_least_one(int n) { return n > 0 ? n : 1; }

template <int SC> void k_op(const Geo& g, const float* s, const float* wk, float* out, float scale, int threads) {
    const int64_t C = g.c, CS = C * SC;
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_rows(g, r0, r1, [&](int64_t row, const RowTaps& taps) {
            blocks<at_least_one(8 / SC)>(C, [&]<int NO>(int64_t o) {  // NO blocks of 8 outputs
              for (int64_t v = row * g.w; v < (row + 1) * g.w; ++v) {
                const Taps& tp = taps[v - row * g.w];
                v8 acc[NO * SC] = {};
                for (int64_t k = 0; k < tp.count; ++k) {
                    const float* src = s + (v + tp.off[k]) * CS + o * SC;
                    const float* wt = wk + tp.tap[k] * CS + o * SC;
                    for (int i = 0; i < NO * SC; ++i) acc[i] += load8(wt + 8 * i) * load8(src + 8 * i);
                }
                for (int i = 0; i < NO; ++i) store8(out + v * C + o + 8 * i, group_sums<SC>(acc + i * SC) * scale);
              }
            });
        });
    });
}

// acc[n][b * SC + j] = sum_t wj[t][j][c + 8b..] * y_n[v + t, c + 8b..] for N inputs y_n, B blocks of
// 8 channels from c; wj the adjoint's table by source, [taps][SC][C].
template <int SC, int B, int N> inline void adjoints_at(const Taps& tp, const float* const (&y)[N], const float* wj,
                                                        int64_t v, int64_t C, int64_t c, v8 (&acc)[N][B * SC]) {
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < B * SC; ++i) acc[n][i] = v8{};
    for (int64_t k = 0; k < tp.count; ++k) {
        const float* wt = wj + tp.tap[k] * SC * C + c;
        const int64_t at = (v + tp.off[k]) * C + c;
        for (int b = 0; b < B; ++b) {
            v8 yv[N];
            for (int n = 0; n < N; ++n) yv[n] = load8(y[n] + at + 8 * b);
            for (int j = 0; j < SC; ++j) {
                v8 wv = load8(wt + j * C + 8 * b);
                for (int n = 0; n < N; ++n) acc[n][b * SC + j] += wv * yv[n];
            }
        }
    }
    for (int n = 0; n < N; ++n)
        for (int b = 0; b < B; ++b) to_source_order<SC>(acc[n] + b * SC, acc[n] + b * SC);
}

template <int SC> void update(const Geo& g, const float* x, const float* t1, const float* s, const float* wj, float* out,
                              float eps, int threads) {
    const int64_t C = g.c, CS = C * SC;
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_rows(g, r0, r1, [&](int64_t row, const RowTaps& taps) {
            blocks<at_least_one(4 / SC)>(C, [&]<int B>(int64_t c) {
              for (int64_t v = row * g.w; v < (row + 1) * g.w; ++v) {
                const Taps& tp = taps[v - row * g.w];
                v8 acc[2][B * SC];
                adjoints_at<SC, B, 2>(tp, {x, t1}, wj, v, C, c, acc);
                for (int i = 0; i < B * SC; ++i) {
                    const int64_t at = v * CS + c * SC + 8 * i;
                    store8(out + at, load8(s + at) * (acc[0][i] + eps) / (acc[1][i] + eps));
                }
              }
            });
        });
    });
}

template <int SC> void ratios(const Geo& g, const float* x, const float* t1, const float* saved, const float* grad,
                              const float* wj, float* r, float* w, float eps, bool relu_input, bool from_output,
                              int threads) {
    const int64_t C = g.c, CS = C * SC;
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_rows(g, r0, r1, [&](int64_t row, const RowTaps& taps) {
            blocks<at_least_one(4 / SC)>(C, [&]<int B>(int64_t c) {
              for (int64_t v = row * g.w; v < (row + 1) * g.w; ++v) {
                const Taps& tp = taps[v - row * g.w];
                v8 acc[2][B * SC];
                adjoints_at<SC, B, 2>(tp, {x, t1}, wj, v, C, c, acc);
                for (int i = 0; i < B * SC; ++i) {
                    const int64_t at = v * CS + c * SC + 8 * i;
                    v8 num = acc[0][i] + eps, den = acc[1][i] + eps, sv = load8(saved + at);
                    store8(r + at, num / den);
                    v8 ws = from_output ? sv / num : sv / den;  // s / D (= out / N from the output)
                    if (relu_input && !from_output) ws = ws > 0 ? ws : v8{};
                    store8(w + at, ws * load8(grad + at));
                }
              }
            });
        });
    });
}

template <int SC> void grad_z(const Geo& g, const float* gt1, const float* wj, float* r, const float* grad,
                              const float* saved, bool relu_input, int threads) {
    const int64_t C = g.c, CS = C * SC;
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_rows(g, r0, r1, [&](int64_t row, const RowTaps& taps) {
            blocks<at_least_one(8 / SC)>(C, [&]<int B>(int64_t c) {
              for (int64_t v = row * g.w; v < (row + 1) * g.w; ++v) {
                const Taps& tp = taps[v - row * g.w];
                v8 acc[1][B * SC];
                adjoints_at<SC, B, 1>(tp, {gt1}, wj, v, C, c, acc);
                for (int i = 0; i < B * SC; ++i) {
                    const int64_t at = v * CS + c * SC + 8 * i;
                    v8 p = acc[0][i] + load8(r + at) * load8(grad + at);
                    if (relu_input) p = load8(saved + at) > 0 ? p : v8{};
                    store8(r + at, p);
                }
              }
            });
        });
    });
}

// gw[t][j][c] = sum_v grad[v, c * SC + j] * y[v + t, c], row by row: a row of grad is first laid out
// by source (blocks of 8 channels: [C / 8][W][SC][8]), then every tap runs along the row with its
// accumulators in registers, U voxels at a time.
template <int SC> void filter_grad(const Geo& g, const float* y, const float* grad, float* gw, int threads) {
    const int64_t C = g.c, CS = C * SC, T = g.taps(), W = g.w;
    constexpr int U = at_least_one(8 / SC) > 1 ? at_least_one(8 / SC) : 2;
    std::vector<std::vector<float>> part(std::max(1, threads));
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int thread) {
        std::vector<float>& acc = part[thread];
        acc.assign(T * CS, 0.0f);
        std::vector<float> row(W * CS);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t hh = r % g.h, dd = (r / g.h) % g.d, n = r / (g.h * g.d);
            for (int64_t w = 0; w < W; ++w)
                for (int64_t c = 0; c < C; c += 8) {
                    v8 in[SC], out[SC];
                    for (int j = 0; j < SC; ++j) in[j] = load8(grad + (r * W + w) * CS + c * SC + 8 * j);
                    by_source<SC>(in, out);
                    for (int j = 0; j < SC; ++j) store8(row.data() + ((c / 8 * W + w) * SC + j) * 8, out[j]);
                }
            for (int64_t a = 0; a < g.kd; ++a) {
                const int64_t d2 = dd + a - g.kd / 2;
                if (d2 < 0 || d2 >= g.d) continue;
                for (int64_t b = 0; b < g.kh; ++b) {
                    const int64_t h2 = hh + b - g.kh / 2;
                    if (h2 < 0 || h2 >= g.h) continue;
                    const float* yrow = y + ((n * g.d + d2) * g.h + h2) * W * C;
                    for (int64_t e = 0; e < g.kw; ++e) {
                        const int64_t shift = e - g.kw / 2, t = (a * g.kh + b) * g.kw + e;
                        const int64_t w0 = std::max<int64_t>(0, -shift), w1 = std::min<int64_t>(W, W - shift);
                        for (int64_t c = 0; c < C; c += 8) {
                            const float* gr = row.data() + c / 8 * W * SC * 8;
                            v8 sum[U][SC] = {};
                            int64_t w = w0;
                            for (; w + U <= w1; w += U)
                                for (int u = 0; u < U; ++u) {
                                    v8 yv = load8(yrow + (w + u + shift) * C + c);
                                    for (int j = 0; j < SC; ++j) sum[u][j] += load8(gr + ((w + u) * SC + j) * 8) * yv;
                                }
                            for (; w < w1; ++w) {
                                v8 yv = load8(yrow + (w + shift) * C + c);
                                for (int j = 0; j < SC; ++j) sum[0][j] += load8(gr + (w * SC + j) * 8) * yv;
                            }
                            for (int j = 0; j < SC; ++j) {
                                v8 total = sum[0][j];
                                for (int u = 1; u < U; ++u) total += sum[u][j];
                                float* dst = acc.data() + (t * SC + j) * C + c;
                                store8(dst, load8(dst) + total);
                            }
                        }
                    }
                }
            }
        }
    });
    std::fill(gw, gw + T * CS, 0.0f);
    for (auto& acc : part)
        for (int64_t i = 0; i < static_cast<int64_t>(acc.size()); ++i) gw[i] += acc[i];
}

Geo geo_of(const int64_t* g) { return Geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]}; }

// Runs f<SC>() for a supported SC; -1 otherwise.
template <class F> int dispatch(int sc, F f) {
    switch (sc) {
        case 1: f.template operator()<1>(); return 0;
        case 2: f.template operator()<2>(); return 0;
        case 4: f.template operator()<4>(); return 0;
        case 8: f.template operator()<8>(); return 0;
        default: return -1;
    }
}

}  // namespace

extern "C" {

// geo: (N, D, H, W, C, kd, kh, kw); C a multiple of 8.
int ndc_k(int sc, const int64_t* geo, const float* s, const float* wk, float* out, float scale, int threads) {
    Geo g = geo_of(geo);
    return dispatch(sc, [&]<int SC>() { k_op<SC>(g, s, wk, out, scale, threads); });
}

int ndc_update(int sc, const int64_t* geo, const float* x, const float* t1, const float* s, const float* wj, float* out,
               float eps, int threads) {
    Geo g = geo_of(geo);
    return dispatch(sc, [&]<int SC>() { update<SC>(g, x, t1, s, wj, out, eps, threads); });
}

int ndc_ratios(int sc, const int64_t* geo, const float* x, const float* t1, const float* saved, const float* grad,
               const float* wj, float* r, float* w, float eps, int relu_input, int from_output, int threads) {
    Geo g = geo_of(geo);
    return dispatch(sc, [&]<int SC>() {
        ratios<SC>(g, x, t1, saved, grad, wj, r, w, eps, relu_input != 0, from_output != 0, threads);
    });
}

int ndc_grad_z(int sc, const int64_t* geo, const float* gt1, const float* wj, float* r, const float* grad,
               const float* saved, int relu_input, int threads) {
    Geo g = geo_of(geo);
    return dispatch(sc, [&]<int SC>() { grad_z<SC>(g, gt1, wj, r, grad, saved, relu_input != 0, threads); });
}

int ndc_filter_grad(int sc, const int64_t* geo, const float* y, const float* grad, float* gw, int threads) {
    Geo g = geo_of(geo);
    return dispatch(sc, [&]<int SC>() { filter_grad<SC>(g, y, grad, gw, threads); });
}

}  // extern "C"
