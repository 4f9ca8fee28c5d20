// Native CPU kernels of Deconver's training step on channels-last float32 tensors: the depth-wise NDC
// update (below), the instance norm and the 1x1 convolutions' weight gradient (at the end).
//
// Notation (deconver/nn/ndc.py): C input channels, SC source channels per channel (G = C groups,
// m = 1), CS = C * SC source channels (source channel c * SC + j), filter taps T = kd * kh * kw.
// Tensors are channels-last: memory order (N, D, H, W, channels); a 2D tensor is D = 1, kd = 1.
// Filters are cross-correlation weights (tap t = (a * kh + b) * kw + e reads the input voxel at
// offset (a - kd/2, b - kh/2, e - kw/2)), zero "same" padding, given as tables: K's wk[T][CS] and
// the adjoint's by source, wj[T][SC][C].
//
//   K(s)[v, c]        = sum_t sum_j wk[t][c*SC+j] * s[v + t, c*SC+j]      (ndc_k)
//   A(y)[v, c*SC+j]   = sum_t wj[t][j][c] * y[v + t, c]                    (inside the three below)
//   out               = s * (A(x) + eps) / (A(t1) + eps)                   (ndc_update)
//   R, w              = N / D, g * s / D  (N = A(x) + eps, D = A(t1) + eps) (ndc_ratios)
//   dL/dz             = (g * R + A(gt1)) * relu'                           (ndc_grad_z)
//   gw[t][j][c]       = sum_v g[v, c*SC+j] * y[v + t, c]                   (ndc_filter_grad)
//
// The element-wise work of the update and of its backward is done where each adjoint is computed,
// so the adjoints never exist as tensors. Vectors of VL = 8 floats (GCC/Clang vector extensions:
// AVX2 or AVX-512VL instructions with -march=native, SSE pairs elsewhere) run over channels, so C
// must be a multiple of 8. Every entry point returns 0, or -1 for an SC it has no kernel for
// (1, 2, 4 and 8 are built; the caller keeps its fallback). Work is split over `threads` threads by
// rows (n, d, h).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr int VL = 8;  // lanes (16-lane vectors on AVX-512 measured no faster overall: docs/nn.md)
typedef float vec __attribute__((vector_size(VL * sizeof(float))));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Lane permutations of two vectors a, b (lanes 0..VL-1 of a, then VL..2VL-1 of b):
// evens/odds: (a0, a2, ..., b0, b2, ...) / (a1, a3, ...); low/high: the interleaving of the first /
// second halves of a and b, (a0, b0, a1, b1, ...) / (a_{VL/2}, b_{VL/2}, ...).
template <std::size_t... I> inline vec evens(vec a, vec b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, (2 * I)...);
}
template <std::size_t... I> inline vec odds(vec a, vec b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, (2 * I + 1)...);
}
template <std::size_t... I> inline vec low(vec a, vec b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, (I / 2 + (I % 2) * VL)...);
}
template <std::size_t... I> inline vec high(vec a, vec b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, (VL / 2 + I / 2 + (I % 2) * VL)...);
}
using lanes = std::make_index_sequence<VL>;

// Sums of SC consecutive lanes of the VL*SC lanes of acc[0..SC): VL sums, in order.
template <int SC> inline vec group_sums(const vec* acc) {
    if constexpr (SC == 1) {
        return acc[0];
    } else {
        vec half[SC / 2];
        for (int i = 0; i < SC / 2; ++i)
            half[i] = evens(acc[2 * i], acc[2 * i + 1], lanes{}) + odds(acc[2 * i], acc[2 * i + 1], lanes{});
        return group_sums<SC / 2>(half);
    }
}

// Source-channel order. The adjoint kernels accumulate "by source": a[j] holds channels c..c+VL-1 of
// source j (lane l: source channel (c + l) * SC + j), which lets the inner loop load y[v + t, c..]
// as it is; to_source_order turns SC such vectors into the tensor's order (vector i, lane l: source
// channel c * SC + VL * i + l), by_source is its inverse: log2(SC) rounds of a perfect shuffle.
template <int SC> inline void to_source_order(vec* a) {
    for (int step = 1; step < SC; step *= 2) {
        vec next[SC];
        for (int i = 0; i < SC / 2; ++i) {
            next[2 * i] = low(a[i], a[i + SC / 2], lanes{});
            next[2 * i + 1] = high(a[i], a[i + SC / 2], lanes{});
        }
        for (int i = 0; i < SC; ++i) a[i] = next[i];
    }
}

template <int SC> inline void by_source(vec* a) {
    for (int step = 1; step < SC; step *= 2) {
        vec next[SC];
        for (int i = 0; i < SC / 2; ++i) {
            next[i] = evens(a[2 * i], a[2 * i + 1], lanes{});
            next[i + SC / 2] = odds(a[2 * i], a[2 * i + 1], lanes{});
        }
        for (int i = 0; i < SC; ++i) a[i] = next[i];
    }
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

// body(i0, i1, thread) on min(threads, count) contiguous ranges of [0, count) (the calling thread takes
// the first); returns the number of ranges.
template <class Body> int parallel_range(int64_t count, int threads, Body body) {
    int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
    std::vector<std::thread> pool;
    for (int i = 1; i < nt; ++i) pool.emplace_back(body, count * i / nt, count * (i + 1) / nt, i);
    body(0, count / nt, 0);
    for (auto& t : pool) t.join();
    return nt;
}

// body(r0, r1, thread) on `threads` contiguous row ranges.
template <class Body> void parallel_rows(const Geo& g, int threads, Body body) {
    parallel_range(g.rows(), threads, body);
}

// Calls f.template operator()<B>(c) over c = 0, VL*B, 2*VL*B, ... while a whole block of B vectors
// fits in `count`, then with B = 1 for the rest (count a multiple of VL): B vectors of channels at a
// time give the inner loops enough independent accumulators to hide the FMA latency.
template <int B, class F> inline void blocks(int64_t count, F f) {
    int64_t c = 0;
    for (; c + VL * B <= count; c += VL * B) f.template operator()<B>(c);
    if constexpr (B > 1)
        for (; c < count; c += VL) f.template operator()<1>(c);
}

constexpr int at_least_one(int n) { return n > 0 ? n : 1; }

// K at P voxels v, v + 1, ... that share one tap list (a row's inner voxels): every filter vector
// is loaded once for the P of them.
template <int SC, int NO, int P>
inline void k_at(const Taps& tp, const float* s, const float* wk, int64_t v, int64_t C, int64_t o, float* out,
                 float scale) {
    const int64_t CS = C * SC;
    vec acc[P][NO * SC] = {};
    for (int64_t k = 0; k < tp.count; ++k) {
        const float* src = s + (v + tp.off[k]) * CS + o * SC;
        const float* wt = wk + tp.tap[k] * CS + o * SC;
        for (int i = 0; i < NO * SC; ++i) {
            vec wv = load(wt + VL * i);
            for (int p = 0; p < P; ++p) acc[p][i] += wv * load(src + p * CS + VL * i);
        }
    }
    for (int p = 0; p < P; ++p)
        for (int i = 0; i < NO; ++i) store(out + (v + p) * C + o + VL * i, group_sums<SC>(acc[p] + i * SC) * scale);
}

template <int SC> void k_op(const Geo& g, const float* s, const float* wk, float* out, float scale, int threads) {
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_rows(g, r0, r1, [&](int64_t row, const RowTaps& taps) {
            blocks<at_least_one(4 / SC)>(g.c, [&]<int NO>(int64_t o) {  // NO vectors of outputs
                for (int64_t w = 0; w < g.w;) {
                    const int64_t v = row * g.w + w;
                    if (w + 1 < g.w && &taps[w] == &taps[w + 1]) {  // two inner voxels
                        k_at<SC, NO, 2>(taps[w], s, wk, v, g.c, o, out, scale);
                        w += 2;
                    } else {
                        k_at<SC, NO, 1>(taps[w], s, wk, v, g.c, o, out, scale);
                        w += 1;
                    }
                }
            });
        });
    });
}

// acc[n][b * SC + j] = A(y_n) at voxel v for B vectors of channels from c, in the tensor's source
// order (see to_source_order), for N inputs y_n read through the same filter taps.
template <int SC, int B, int N>
inline void adjoints_at(const Taps& tp, const float* const (&y)[N], const float* wj, int64_t v, int64_t C, int64_t c,
                        vec (&acc)[N][B * SC]) {
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < B * SC; ++i) acc[n][i] = vec{};
    for (int64_t k = 0; k < tp.count; ++k) {
        const float* wt = wj + tp.tap[k] * SC * C + c;
        const int64_t at = (v + tp.off[k]) * C + c;
        for (int b = 0; b < B; ++b) {
            vec yv[N];
            for (int n = 0; n < N; ++n) yv[n] = load(y[n] + at + VL * b);
            for (int j = 0; j < SC; ++j) {
                vec wv = load(wt + j * C + VL * b);
                for (int n = 0; n < N; ++n) acc[n][b * SC + j] += wv * yv[n];
            }
        }
    }
    for (int n = 0; n < N; ++n)
        for (int b = 0; b < B; ++b) to_source_order<SC>(acc[n] + b * SC);
}

// body(i, a) for every vector a of source channels of every voxel of rows [r0, r1), i its offset in
// a source-sized tensor, with acc the N adjoints there (adjoints_at).
template <int SC, int N, class Body>
void for_adjoints(const Geo& g, int64_t r0, int64_t r1, const float* const (&y)[N], const float* wj, Body body) {
    const int64_t C = g.c, CS = C * SC;
    for_rows(g, r0, r1, [&](int64_t row, const RowTaps& taps) {
        blocks<at_least_one(8 / (SC * N))>(C, [&]<int B>(int64_t c) {
            for (int64_t v = row * g.w; v < (row + 1) * g.w; ++v) {
                vec acc[N][B * SC];
                adjoints_at<SC, B, N>(taps[v - row * g.w], y, wj, v, C, c, acc);
                for (int i = 0; i < B * SC; ++i) {
                    vec a[N];
                    for (int n = 0; n < N; ++n) a[n] = acc[n][i];
                    body(v * CS + c * SC + VL * i, a);
                }
            }
        });
    });
}

template <int SC> void update(const Geo& g, const float* x, const float* t1, const float* s, const float* wj,
                                      float* out, float eps, int threads) {
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_adjoints<SC, 2>(g, r0, r1, {x, t1}, wj, [&](int64_t i, const vec* a) {
            store(out + i, load(s + i) * (a[0] + eps) / (a[1] + eps));
        });
    });
}

template <int SC> void ratios(const Geo& g, const float* x, const float* t1, const float* saved,
                                      const float* grad, const float* wj, float* r, float* w, float eps,
                                      bool relu_input, bool from_output, int threads) {
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_adjoints<SC, 2>(g, r0, r1, {x, t1}, wj, [&](int64_t i, const vec* a) {
            vec num = a[0] + eps, den = a[1] + eps, sv = load(saved + i);
            store(r + i, num / den);
            vec ws = from_output ? sv / num : sv / den;  // s / D (= out / N from the output)
            if (relu_input && !from_output) ws = ws > 0 ? ws : vec{};
            store(w + i, ws * load(grad + i));
        });
    });
}

template <int SC> void grad_z(const Geo& g, const float* gt1, const float* wj, float* r, const float* grad,
                                      const float* saved, bool relu_input, int threads) {
    parallel_rows(g, threads, [&](int64_t r0, int64_t r1, int) {
        for_adjoints<SC, 1>(g, r0, r1, {gt1}, wj, [&](int64_t i, const vec* a) {
            vec p = a[0] + load(r + i) * load(grad + i);
            if (relu_input) p = load(saved + i) > 0 ? p : vec{};
            store(r + i, p);
        });
    });
}

// gw[t][j][c] = sum_v grad[v, c * SC + j] * y[v + t, c], row by row: a row of grad is first laid out
// by source (vectors of channels: [C / VL][W][SC][VL]), then every tap runs along the row with its
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
                for (int64_t c = 0; c < C; c += VL) {
                    vec a[SC];
                    for (int j = 0; j < SC; ++j) a[j] = load(grad + (r * W + w) * CS + c * SC + VL * j);
                    by_source<SC>(a);
                    for (int j = 0; j < SC; ++j) store(row.data() + ((c / VL * W + w) * SC + j) * VL, a[j]);
                }
            for (int64_t ta = 0; ta < g.kd; ++ta) {
                const int64_t d2 = dd + ta - g.kd / 2;
                if (d2 < 0 || d2 >= g.d) continue;
                for (int64_t tb = 0; tb < g.kh; ++tb) {
                    const int64_t h2 = hh + tb - g.kh / 2;
                    if (h2 < 0 || h2 >= g.h) continue;
                    const float* yrow = y + ((n * g.d + d2) * g.h + h2) * W * C;
                    for (int64_t e = 0; e < g.kw; ++e) {
                        const int64_t shift = e - g.kw / 2, t = (ta * g.kh + tb) * g.kw + e;
                        const int64_t w0 = std::max<int64_t>(0, -shift), w1 = std::min<int64_t>(W, W - shift);
                        for (int64_t c = 0; c < C; c += VL) {
                            const float* gr = row.data() + c / VL * W * SC * VL;
                            vec sum[U][SC] = {};
                            int64_t w = w0;
                            for (; w + U <= w1; w += U)
                                for (int u = 0; u < U; ++u) {
                                    vec yv = load(yrow + (w + u + shift) * C + c);
                                    for (int j = 0; j < SC; ++j) sum[u][j] += load(gr + ((w + u) * SC + j) * VL) * yv;
                                }
                            for (; w < w1; ++w) {
                                vec yv = load(yrow + (w + shift) * C + c);
                                for (int j = 0; j < SC; ++j) sum[0][j] += load(gr + (w * SC + j) * VL) * yv;
                            }
                            for (int j = 0; j < SC; ++j) {
                                vec total = sum[0][j];
                                for (int u = 1; u < U; ++u) total += sum[u][j];
                                float* dst = acc.data() + (t * SC + j) * C + c;
                                store(dst, load(dst) + total);
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

// Runs f.template operator()<SC>() for a supported SC; -1 otherwise (ndc_supports says which).
template <class F> int dispatch(int sc, F f) {
    switch (sc) {
        case 1: f.template operator()<1>(); return 0;
        case 2: f.template operator()<2>(); return 0;
        case 4: f.template operator()<4>(); return 0;
        case 8: f.template operator()<8>(); return 0;
        default: return -1;
    }
}

// Instance normalisation without affine parameters, channels-last: every (sample, channel) over its
// S = D * H * W voxels, y = (x - mean) * rstd with rstd = 1 / sqrt(var + eps), var the biased variance
// (torch.nn.functional.instance_norm). Sums are taken in double: the mean in one pass, the variance
// around it in a second (no cancellation), the output in a third. The backward, with x^ = (x - mean)
// * rstd and the means over voxels of g and g * x^: dx = rstd * (g - mean(g) - x^ * mean(g * x^)).
// Voxels are split over the threads; every thread sums into its own row of doubles.

// acc[c] = sum over the voxels of one sample of f(v, c), for c < C (acc: C doubles).
template <class F> void channel_sums(int64_t S, int64_t C, int threads, double* acc, F f) {
    std::vector<double> part(static_cast<size_t>(std::max(threads, 1)) * C, 0.0);
    int nt = parallel_range(S, threads, [&](int64_t v0, int64_t v1, int t) {
        double* a = part.data() + t * C;
        for (int64_t v = v0; v < v1; ++v)
            for (int64_t c = 0; c < C; ++c) a[c] += f(v, c);
    });
    for (int64_t c = 0; c < C; ++c) {
        double sum = 0;
        for (int t = 0; t < nt; ++t) sum += part[t * C + c];
        acc[c] = sum;
    }
}

void norm_forward(const Geo& g, const float* x, float* y, float* mean, float* rstd, float eps, int threads) {
    const int64_t S = g.d * g.h * g.w, C = g.c;
    std::vector<double> acc(C), m(C);
    for (int64_t n = 0; n < g.n; ++n) {
        const float* xn = x + n * S * C;
        float* mu = mean + n * C;
        float* r = rstd + n * C;
        channel_sums(S, C, threads, acc.data(), [&](int64_t v, int64_t c) { return double(xn[v * C + c]); });
        for (int64_t c = 0; c < C; ++c) m[c] = acc[c] / S;
        channel_sums(S, C, threads, acc.data(), [&](int64_t v, int64_t c) {
            double d = xn[v * C + c] - m[c];
            return d * d;
        });
        for (int64_t c = 0; c < C; ++c) {
            mu[c] = static_cast<float>(m[c]);
            r[c] = static_cast<float>(1.0 / std::sqrt(acc[c] / S + eps));
        }
        float* yn = y + n * S * C;
        parallel_range(S, threads, [&](int64_t v0, int64_t v1, int) {
            for (int64_t v = v0; v < v1; ++v)
                for (int64_t c = 0; c < C; ++c) yn[v * C + c] = (xn[v * C + c] - mu[c]) * r[c];
        });
    }
}

void norm_backward(const Geo& g, const float* x, const float* grad, const float* mean, const float* rstd, float* dx,
                   int threads) {
    const int64_t S = g.d * g.h * g.w, C = g.c;
    std::vector<double> sum_g(C), sum_gx(C);
    std::vector<float> a(C), b(C);
    for (int64_t n = 0; n < g.n; ++n) {
        const float* xn = x + n * S * C;
        const float* gn = grad + n * S * C;
        const float* mu = mean + n * C;
        const float* r = rstd + n * C;
        channel_sums(S, C, threads, sum_g.data(), [&](int64_t v, int64_t c) { return double(gn[v * C + c]); });
        channel_sums(S, C, threads, sum_gx.data(), [&](int64_t v, int64_t c) {
            return double(gn[v * C + c]) * (xn[v * C + c] - mu[c]);
        });
        for (int64_t c = 0; c < C; ++c) {
            a[c] = static_cast<float>(sum_g[c] / S);                       // mean(g)
            b[c] = static_cast<float>(sum_gx[c] / S * r[c] * r[c]);        // mean(g * x^) * rstd
        }
        float* dn = dx + n * S * C;
        parallel_range(S, threads, [&](int64_t v0, int64_t v1, int) {
            for (int64_t v = v0; v < v1; ++v)
                for (int64_t c = 0; c < C; ++c)
                    dn[v * C + c] = r[c] * (gn[v * C + c] - a[c] - (xn[v * C + c] - mu[c]) * b[c]);
        });
    }
}

// The weight gradient of a 1x1 convolution on channels-last tensors: gw[o][c] = sum_v g[v][o] * x[v][c]
// and gb[o] = sum_v g[v][o] (g: V x O, x: V x C, both row-major), a GEMM whose reduction runs over the
// voxels. Tiles of MR = 8 outputs by NV wide vectors of inputs stay in registers over a block of
// voxels that fits the L2 cache; every thread takes its own output rows (no shared accumulators).
constexpr int WL = 16;  // lanes of the wide vectors (one AVX-512 register; two AVX2 registers elsewhere)
typedef float wvec __attribute__((vector_size(WL * sizeof(float))));
inline wvec wload(const float* p) { wvec v; std::memcpy(&v, p, sizeof v); return v; }
inline void wstore(float* p, wvec v) { std::memcpy(p, &v, sizeof v); }
constexpr int MR = 8;

// One tile: gw[o..o+MR][c..c+NV*WL] += the block's sums (started from zero: a block's partial sum is
// added to the total, which keeps the rounding of long reductions small); with B, also gb[o..o+MR].
template <int NV, bool B>
inline void wgrad_tile(const float* g, const float* x, int64_t v0, int64_t v1, int64_t O, int64_t C, int64_t o,
                       int64_t c, float* gw, double* gb) {
    wvec acc[MR][NV] = {};
    vec bias = {};
    for (int64_t v = v0; v < v1; ++v) {
        wvec xv[NV];
        for (int j = 0; j < NV; ++j) xv[j] = wload(x + v * C + c + WL * j);
        const float* gv = g + v * O + o;
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NV; ++j) acc[i][j] += gv[i] * xv[j];
        if constexpr (B) bias += load(gv);
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) {
            float* dst = gw + (o + i) * C + c + WL * j;
            wstore(dst, wload(dst) + acc[i][j]);
        }
    if constexpr (B)
        for (int i = 0; i < MR; ++i) gb[o + i] += bias[i];
}

void wgrad(int64_t V, int64_t O, int64_t C, const float* g, const float* x, float* gw, float* gb, int threads) {
    static_assert(MR == VL, "the bias sums load MR outputs as one vector");
    std::memset(gw, 0, sizeof(float) * O * C);
    std::vector<double> bias(O, 0.0);
    const int64_t block = std::clamp<int64_t>((1 << 18) / ((O + C) * int64_t(sizeof(float))), 16, 1024);
    parallel_range(O / MR, threads, [&](int64_t t0, int64_t t1, int) {
        for (int64_t v0 = 0; v0 < V; v0 += block) {
            int64_t v1 = std::min(V, v0 + block);
            for (int64_t t = t0; t < t1; ++t) {
                int64_t o = t * MR, c = 0;
                bool b = gb != nullptr;  // the bias rides along with the first tile of the row
                for (; c + 3 * WL <= C; c += 3 * WL, b = false)
                    b ? wgrad_tile<3, true>(g, x, v0, v1, O, C, o, c, gw, bias.data())
                      : wgrad_tile<3, false>(g, x, v0, v1, O, C, o, c, gw, nullptr);
                for (; c < C; c += WL, b = false)
                    b ? wgrad_tile<1, true>(g, x, v0, v1, O, C, o, c, gw, bias.data())
                      : wgrad_tile<1, false>(g, x, v0, v1, O, C, o, c, gw, nullptr);
            }
        }
    });
    if (gb)
        for (int64_t o = 0; o < O; ++o) gb[o] = static_cast<float>(bias[o]);
}

}  // namespace

extern "C" {

// 1 if the kernels take a layer of C channels with SC source channels each, else 0.
int ndc_supports(int sc, int64_t c) {
    return c > 0 && c % VL == 0 && dispatch(sc, []<int SC>() {}) == 0;
}

// geo: (N, D, H, W, C, kd, kh, kw), with ndc_supports(sc, C).
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

// geo: (N, D, H, W, C, 1, 1, 1); x, y, grad, dx: channels-last (N, S, C); mean, rstd: (N, C). dx may be grad.
int instance_norm_forward(const int64_t* geo, const float* x, float* y, float* mean, float* rstd, float eps,
                          int threads) {
    norm_forward(geo_of(geo), x, y, mean, rstd, eps, threads);
    return 0;
}

int instance_norm_backward(const int64_t* geo, const float* x, const float* grad, const float* mean,
                           const float* rstd, float* dx, int threads) {
    norm_backward(geo_of(geo), x, grad, mean, rstd, dx, threads);
    return 0;
}

// 1 if weight_grad takes O outputs and C inputs (O a multiple of 8, C of 16), else 0.
int weight_grad_supports(int64_t o, int64_t c) { return o > 0 && c > 0 && o % MR == 0 && c % WL == 0; }

// g: (V, O), x: (V, C), gw: (O, C), gb: (O) or null; -1 (nothing written) unless weight_grad_supports(O, C).
int weight_grad(int64_t v, int64_t o, int64_t c, const float* g, const float* x, float* gw, float* gb, int threads) {
    if (!weight_grad_supports(o, c)) return -1;
    wgrad(v, o, c, g, x, gw, gb, threads);
    return 0;
}

}  // extern "C"
