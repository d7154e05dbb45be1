/* One-pass CPU kernels for the hot quantizers; fourbit/formats/kernels.py loads them.
 *
 * Each kernel is the pure-PyTorch definition in formats/*.py, op for op in float32 (the
 * same IEEE divisions, multiplications and round-half-even), fused into one pass over
 * memory; tests/test_fast_paths.py asserts bit equality. Built with -ffp-contract=off and
 * without -ffast-math, so the compiler may neither fuse a multiply-add nor reorder.
 * Arrays are contiguous float32 / uint8. Parallel loops split fixed-size work items, so
 * every result (reductions included) is independent of the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PARALLEL_MIN 65536 /* below this many elements a thread team costs more than it saves */
#define CHUNK 16384        /* elements per work item: a multiple of 8, so packed bytes never split */

/* for (ch ...) over the chunks of [0, n), in parallel; each body handles [lo, hi) with plain
 * loops the compiler vectorizes (it does not vectorize inside an OpenMP reduction). */
#define CHUNK_BOUNDS(ch, n, lo, hi) \
    int64_t lo = (ch) * CHUNK, hi = lo + CHUNK < (n) ? lo + CHUNK : (n)

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bits[j] = flags[8j] | flags[8j+1] << 1 | ... (flags 0 or 1, zero-padded to a multiple of
 * 8): one multiply per byte, as the magic constant moves byte k's low bit to bit 56 + k
 * without carries */
static inline void pack_flags(const uint8_t *flags, int64_t m, uint8_t *bits) {
    for (int64_t j = 0; j < (m + 7) / 8; j++) {
        uint64_t eight;
        memcpy(&eight, flags + 8 * j, 8);
        bits[j] = (uint8_t)((eight * 0x0102040810204080ull) >> 56);
    }
}

/* 2**e as a float32, exact for -149 <= e <= 127 */
static inline float pow2f(int e) {
    return e >= -126 ? float_of((uint32_t)(e + 127) << 23) : float_of(1u << (e + 149));
}

/* ---- IntFormat: clamp(round_half_even(clip(x) / scale), qmin, qmax) ------------------------
 * clip(x) = min(max(x, lo), hi) (PACT; lo = -inf, hi = inf for none); NaN stays NaN.
 * values[i] = q * scale. nibbles (optional): 4-bit two's-complement codes, two per byte, the
 * even element in the low nibble. clip (optional): bit i%8 of byte i/8 set when x was clipped,
 * i.e. x >= hi, or x <= lo (clip_signed) / x < lo (unsigned). Returns the number of NaNs. */
static int64_t int_quantize_range(const float *restrict x, int64_t m, float scale, float lo_clip,
                                  float hi_clip, float qmin, float qmax, int clip_signed,
                                  float *restrict values, uint8_t *restrict codes, uint8_t *restrict flags) {
    int32_t nans = 0;
    uint8_t at_lo = (uint8_t)clip_signed; /* x == lo counts as clipped only on a signed grid */
    for (int64_t i = 0; i < m; i++) {
        float v = x[i];
        float y = v < lo_clip ? lo_clip : v;
        y = y > hi_clip ? hi_clip : y;
        float q = rintf(y / scale);
        q = q < qmin ? qmin : q;
        q = (q > qmax ? qmax : q) + 0.0f; /* an integer has no -0 */
        values[i] = q * scale;
        nans += q != q;
        codes[i] = (uint8_t)((int32_t)(q == q ? q : 0.0f) & 0x0F);
        flags[i] = (uint8_t)((v >= hi_clip) | (v < lo_clip) | (at_lo & (v == lo_clip)));
    }
    return nans;
}

int64_t fb_int_quantize(const float *x, int64_t n, float scale, float lo_clip, float hi_clip, float qmin,
                        float qmax, float *values, uint8_t *nibbles, uint8_t *clip, int clip_signed,
                        int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK, nans = 0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : nans) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        uint8_t codes[CHUNK + 1], flags[CHUNK + 8];
        nans += int_quantize_range(x + lo, hi - lo, scale, lo_clip, hi_clip, qmin, qmax, clip_signed,
                                   values + lo, codes, flags);
        int64_t m = hi - lo;
        codes[m] = 0;
        for (int64_t k = m; k < m + 8; k++) flags[k] = 0;
        if (nibbles)
            for (int64_t j = 0; j < (m + 1) / 2; j++) nibbles[lo / 2 + j] = codes[2 * j] | (codes[2 * j + 1] << 4);
        if (clip) pack_flags(flags, m, clip + lo / 8);
    }
    return nans;
}

/* Inverse of the nibble packing: out[i] = code_i * scale (codes sign-extended when signed),
 * through a 256-entry table of the two values each byte holds. */
void fb_int_decode(const uint8_t *nibbles, int64_t n, float scale, int is_signed, float *out,
                   int nthreads) {
    float pairs[256][2];
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 2; k++) {
            int code = (b >> (4 * k)) & 0x0F;
            pairs[b][k] = (float)(is_signed ? (code ^ 8) - 8 : code) * scale;
        }
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        for (int64_t i = lo; i + 1 < hi; i += 2) memcpy(out + i, pairs[nibbles[i / 2]], 8);
        if ((hi - lo) % 2) out[hi - 1] = pairs[nibbles[(hi - 1) / 2]][0];
    }
}

/* ---- PACT backward: straight-through inside the clip, the clip level's gradient outside ----
 * d is zeroed where the clip bit is set; top/bottom receive the sums of d over clipped
 * elements whose code is > 0 / < 0. Sums run in double per chunk, chunks added in order. */
void fb_pact_backward(float *d, int64_t n, const uint8_t *clip, const uint8_t *nibbles, int is_signed,
                      double *top, double *bottom, int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *partial = malloc(2 * (chunks + 1) * sizeof(double));
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        double t = 0, b = 0;
        for (int64_t j = lo / 8; j < (hi + 7) / 8; j++) {
            if (!clip[j]) continue; /* most bytes: nothing clipped among these eight */
            for (int64_t i = 8 * j; i < 8 * j + 8 && i < hi; i++) {
                if (!((clip[j] >> (i % 8)) & 1)) continue;
                int code = (nibbles[i / 2] >> ((i & 1) * 4)) & 0x0F;
                if (is_signed) code = (code ^ 8) - 8;
                if (code > 0) t += d[i];
                if (code < 0) b += d[i];
                d[i] = 0.0f;
            }
        }
        partial[2 * ch] = t;
        partial[2 * ch + 1] = b;
    }
    double t = 0, b = 0;
    for (int64_t ch = 0; ch < chunks; ch++) {
        t += partial[2 * ch];
        b += partial[2 * ch + 1];
    }
    free(partial);
    *top = t;
    *bottom = b;
}

/* ---- LogFormat (and any grid whose rounding depends on the exponent and top j mantissa
 * bits): y = (x * premul) / scale, q = copysign(table[(bits(y) >> shift) & mask], y),
 * out = q * scale. NaN stays NaN through the table: arithmetic returns quiet NaNs, whose top
 * mantissa bit is set, and the table holds NaN at every such index. Two tables give both
 * phases of two-phase rounding in one pass (table1 / out1 NULL for one). */
static inline float table_round(float y, const uint32_t *table, int shift, uint32_t mask, float scale) {
    uint32_t u = bits_of(y);
    return float_of(table[(u >> shift) & mask] | (u & 0x80000000u)) * scale;
}

static void table_range(const float *restrict x, int64_t m, float premul, float scale,
                        const uint32_t *restrict table0, const uint32_t *restrict table1, int shift,
                        uint32_t mask, float *restrict out0, float *restrict out1) {
    if (table1) {
        for (int64_t i = 0; i < m; i++) {
            float y = (x[i] * premul) / scale;
            out0[i] = table_round(y, table0, shift, mask, scale);
            out1[i] = table_round(y, table1, shift, mask, scale);
        }
    } else {
        for (int64_t i = 0; i < m; i++) out0[i] = table_round((x[i] * premul) / scale, table0, shift, mask, scale);
    }
}

void fb_table_quantize(const float *x, int64_t n, float premul, float scale, const uint32_t *table0,
                       const uint32_t *table1, int shift, uint32_t mask, float *out0, float *out1,
                       int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        table_range(x + lo, hi - lo, premul, scale, table0, table1, shift, mask, out0 + lo,
                    table1 ? out1 + lo : NULL);
    }
}

/* ---- LogFormat, stochastic (LUQ): y = x / scale, a = |y|; k = ceil((phase - floor_log2 a) / j)
 * indexes the largest grid magnitude 2**(phase - j·k) <= a; hi = 2**(phase - j·(kc - 1)) with
 * kc = clamp(k, 1, kmax + 1), lo = hi / 2**j (0 below the grid, k > kmax). Between lo and hi:
 * hi when u_round · (hi - lo) < a - lo. Below the grid: hi when u_under · hi < a (stochastic
 * underflow) or a >= hi / 2 (u_under NULL). a >= 2**phase or inf saturates; 0 stays 0 (signed),
 * NaN stays NaN; out = q · scale. */
static inline int floor_log2_nonneg(float a) { /* a finite and >= 0 (0 gives -150); no branch */
    int sub = (bits_of(a) >> 23) == 0; /* a subnormal, made normal by 2**23 (exactly) */
    return (int)(bits_of(sub ? a * 8388608.0f : a) >> 23) - 127 - (sub ? 23 : 0);
}

/* Inlined with the radix exponent j and the presence of u_under as constants: a division
 * by a variable j costs more than all the rest of the element, and with constants (and no
 * branch: selects of floats only) gcc vectorizes the loop. */
static inline __attribute__((always_inline)) void log_stochastic_range(const float *x, int64_t lo_i, int64_t hi_i,
                                                                        float scale, int phase, int j, int kmax,
                                                                        const float *u_round,
                                                                        const float *u_under, int under,
                                                                        float *out) {
    for (int64_t i = lo_i; i < hi_i; i++) {
        float y = x[i] / scale, a = fabsf(y), ur = u_round[i], uu = u_under[i];
        int finite = (a > 0.0f) & (a <= 3.4028234663852886e38f);
        int t = (finite ? floor_log2_nonneg(a) : 0) - phase;
        int k = -(t >= 0 ? t / j : -((-t + j - 1) / j)); /* -floor(t / j) */
        int kc = k < 1 ? 1 : (k > kmax + 1 ? kmax + 1 : k);
        float hi = pow2f(phase - j * (kc - 1)), lo = k > kmax ? 0.0f : hi / (float)(1 << j);
        float q_under = (under ? uu * hi < a : a >= hi / 2.0f) ? hi : 0.0f; /* (float selects vectorize) */
        float q_round = ur * (hi - lo) < a - lo ? hi : lo;
        float q = lo == 0.0f ? q_under : q_round;
        q = ((k <= 0) | (a == INFINITY)) ? pow2f(phase) : q;
        q = a == 0.0f ? 0.0f : q;
        out[i] = (a != a ? y : copysignf(q, y)) * scale;
    }
}

#define LOG_STOCHASTIC_J(J)                                                                        \
    if (u_under)                                                                                   \
        log_stochastic_range(x, lo, hi, scale, phase, J, kmax, u_round, u_under, 1, out);          \
    else /* (u_round stands in for the draws not read) */                                          \
        log_stochastic_range(x, lo, hi, scale, phase, J, kmax, u_round, u_round, 0, out);

void fb_log_stochastic(const float *x, int64_t n, float scale, int phase, int j, int kmax, const float *u_round,
                       const float *u_under, float *out, int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        if (j == 1) {
            LOG_STOCHASTIC_J(1)
        } else if (j == 2) {
            LOG_STOCHASTIC_J(2)
        } else if (j == 3) {
            LOG_STOCHASTIC_J(3)
        } else {
            LOG_STOCHASTIC_J(j)
        }
    }
}

/* ---- FloatFormat, subnormals kept, saturating ---------------------------------------------
 * For emin >= -126: quantum = 2**(max(floor_log2|y|, emin) - M), t = |y| / quantum (exact),
 * q = r(t) · quantum, where r is rint (nearest-even) or, with a draw u in [0, 1), floor(t) + 1
 * when u < t - floor(t) (stochastic); q > maxv (|y| = inf included) gives `top` (maxv, or
 * inf/NaN for IEEE-like overflow). Written with selects, not branches, so the compiler
 * vectorizes it; callers pass `stochastic` as a constant. */
static inline __attribute__((always_inline)) float float_round(float y, int M, int emin, float maxv, float top,
                                                                int stochastic, float u) {
    float a = fabsf(y);
    int e = (int)(bits_of(a) >> 23) - 127; /* -127 for zero and float32 subnormals */
    e = e < emin ? emin : (e > 127 ? 127 : e);
    int k = e - M; /* the quantum's exponent, >= -149 */
    float quantum = float_of(k >= -126 ? (uint32_t)(k + 127) << 23 : 1u << ((k + 149) & 31));
    float t = a / quantum, r;
    if (stochastic) {
        r = floorf(t);
        r += (float)(u < t - r);
    } else {
        r = rintf(t);
    }
    float q = r * quantum;
    q = copysignf(q > maxv ? top : q, y);
    return a != a ? y : q;
}

/* u: one draw per element for stochastic rounding, NULL for nearest */
void fb_float_quantize(const float *x, int64_t n, float scale, int M, int emin, float maxv, float top,
                       const float *u, float *out, int nthreads) {
    if (u) {
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) out[i] = float_round(x[i] / scale, M, emin, maxv, top, 1, u[i]) * scale;
    } else {
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
        for (int64_t i = 0; i < n; i++) out[i] = float_round(x[i] / scale, M, emin, maxv, top, 0, 0.0f) * scale;
    }
}

/* ---- BlockFormat: fp4 e2m1 elements, one scale per tile of R x C elements ------------------
 * x is `count` row-major matrices of `mrows` x `cols`; tiles start at multiples of R and C
 * within each matrix (1-D blocks along rows: R = 1), edge tiles are smaller (the reference's
 * zero padding changes nothing). Per tile: any NaN/inf -> every element NaN;
 * v = clamp(y / d, ±FLT_MAX); amax = max |v|; scale s = 2**clamp(floor_log2(amax) - 2,
 * -127, 127) (e8m0; amax 0 -> 2**-127) or s = e4m3(amax / 6) (e4m3); elements e2m1(v / s)
 * (0 when s = 0); out = (e · s) · d. Maxima of |v| run on the bit patterns (for
 * non-negative floats, integer order is float order), which vectorizes.
 * Stochastic rounding of the elements (u not NULL): tile t's draws are u[t·R·C ...], row-major
 * within the full R x C tile (the reference's padded block layout).
 * Codes (optional): e2m1 element codes (sign << 3 | index of |e| in 0, .5, 1, 1.5, 2, 3, 4, 6)
 * and scale codes (e8m0: exponent + 127, 255 for NaN; e4m3: its bit pattern, 0x7F for NaN). */
static const float E2M1_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static inline uint8_t e2m1_code(float e) {
    static const uint8_t by_twice[13] = {0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7};
    return (uint8_t)(by_twice[(int)(fabsf(e) * 2.0f)] | (signbit(e) ? 8 : 0));
}

static inline uint8_t e4m3_code(float s) { /* s: NaN or a non-negative e4m3 value */
    if (s != s) return 0x7F;
    uint32_t u = bits_of(s);
    int e = (int)(u >> 23) - 127;
    if (e < -6) return (uint8_t)(s * 512.0f); /* subnormal (and zero): m · 2**-9 */
    return (uint8_t)(((e + 7) << 3) | ((u >> 20) & 7));
}

static inline float e4m3_value(uint8_t c) {
    int fld = (c >> 3) & 15, mant = c & 7;
    if (c == 0x7F) return NAN;
    return fld ? (float)(8 + mant) * pow2f(fld - 10) : (float)mant * pow2f(-9);
}

/* the block scale a scale code stands for (e4m3, or e8m0 with 255 for NaN) */
static inline float scale_value(uint8_t code, int e4m3) {
    return e4m3 ? e4m3_value(code) : (code == 255 ? NAN : pow2f(code - 127));
}

/* A block's scale s from the maxima (bit patterns) of |y| and |v| = |clamp(y / d)| over it,
 * and its code; NaN when the block holds a NaN or inf. */
static inline float block_scale(uint32_t ymax, uint32_t vmax, int e4m3, uint8_t *scale_code) {
    if (ymax >= 0x7F800000u) {
        *scale_code = e4m3 ? 0x7F : 255;
        return NAN;
    }
    if (e4m3) {
        float s = float_round(float_of(vmax) / 6.0f, 3, -6, 448.0f, 448.0f, 0, 0.0f);
        *scale_code = e4m3_code(s);
        return s;
    }
    int e = vmax == 0 ? -127 : (int)(vmax >> 23) - 127 - 2;
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
    *scale_code = (uint8_t)(e + 127);
    return pow2f(e);
}

/* v = clamp(y / d, ±FLT_MAX), the value a block's scale is fitted to */
static inline float block_input(float y, float d) {
    const float big = 3.4028234663852886e38f;
    float v = y / d;
    return v > big ? big : (v < -big ? -big : v);
}

/* the e2m1 element of v in a block of scale s (> 0, else the element is 0) */
static inline __attribute__((always_inline)) float block_element(float v, float s, int stochastic, float u) {
    return s > 0.0f ? float_round(v / s, 1, 0, 6.0f, 6.0f, stochastic, u) : 0.0f;
}

/* A block's first pass over one row of w elements: v = block_input(y) into o, and per
 * column the running maxima of the bit patterns of |y| and |v|. */
static inline __attribute__((always_inline)) void block_scan_row(const float *y, float *o, int64_t w, float d,
                                                                 uint32_t *ymax, uint32_t *vmax) {
    for (int64_t c = 0; c < w; c++) {
        uint32_t a = bits_of(y[c]) & 0x7FFFFFFFu;
        float v = block_input(y[c], d);
        o[c] = v;
        uint32_t b = bits_of(v) & 0x7FFFFFFFu;
        ymax[c] = ymax[c] > a ? ymax[c] : a;
        vmax[c] = vmax[c] > b ? vmax[c] : b;
    }
}

/* The second pass over one row: each v in o rounded in its block's scale s[c] (draws u, or
 * NULL for nearest), its code into k (unless NULL), its value (e·s)·d into o. Separate
 * loops, so that the rounding vectorizes apart from the codes' table look-ups. A NaN scale
 * gives elements 0, codes 0 and values NaN. */
static inline __attribute__((always_inline)) void block_round_row(float *o, uint8_t *k, int64_t w, const float *s,
                                                                  const float *u, float d) {
    float e[w];
    if (u)
        for (int64_t c = 0; c < w; c++) e[c] = block_element(o[c], s[c], 1, u[c]);
    else
        for (int64_t c = 0; c < w; c++) e[c] = block_element(o[c], s[c], 0, 0.0f);
    if (k)
        for (int64_t c = 0; c < w; c++) k[c] = e2m1_code(e[c]);
    for (int64_t c = 0; c < w; c++) o[c] = (e[c] * s[c]) * d;
}

/* One tile: rows r0..r1-1, `width` columns from c0; returns its scale code. Inlined with
 * width 16 or 32 as a constant, so the compiler unrolls and vectorizes the short loops. */
static inline __attribute__((always_inline)) uint8_t block_tile(const float *x, float *out, uint8_t *codes,
                                                                int64_t r0, int64_t r1, int64_t c0,
                                                                int64_t width, int64_t cols, float d,
                                                                int e4m3, const float *u, int C) {
    uint32_t ymax[width], vmax[width], ytile = 0, vtile = 0;
    for (int64_t c = 0; c < width; c++) ymax[c] = vmax[c] = 0;
    for (int64_t r = r0; r < r1; r++) block_scan_row(x + r * cols + c0, out + r * cols + c0, width, d, ymax, vmax);
    for (int64_t c = 0; c < width; c++) {
        ytile = ytile > ymax[c] ? ytile : ymax[c];
        vtile = vtile > vmax[c] ? vtile : vmax[c];
    }
    uint8_t scale_code;
    float s[width];
    s[0] = block_scale(ytile, vtile, e4m3, &scale_code);
    for (int64_t c = 1; c < width; c++) s[c] = s[0];
    for (int64_t r = r0; r < r1; r++)
        block_round_row(out + r * cols + c0, codes ? codes + r * cols + c0 : NULL, width, s,
                        u ? u + (r - r0) * C : NULL, d);
    return scale_code;
}

/* Tiles are visited band by band (R rows of one matrix: tiles band·tcols ... band·tcols +
 * tcols - 1), so that index arithmetic costs a division per band, not several per tile: with
 * 1-D blocks of 16 those divisions cost more than quantizing the block. */
static inline void band_rows(int64_t band, int64_t mrows, int R, int64_t *r0, int64_t *r1) {
    if (R == 1) {
        *r0 = band, *r1 = band + 1;
        return;
    }
    int64_t trows = (mrows + R - 1) / R, m = band / trows;
    *r0 = m * mrows + (band - m * trows) * R;
    *r1 = *r0 + R < (m + 1) * mrows ? *r0 + R : (m + 1) * mrows;
}

/* codes / scale_codes NULL: values only (quantize); else encode too (one scale code per tile,
 * tiles numbered matrix by matrix, row-major). */
void fb_block_quantize(const float *x, int64_t count, int64_t mrows, int64_t cols, int R, int C, float d,
                       int e4m3, const float *u, float *out, uint8_t *codes, uint8_t *scale_codes,
                       int nthreads) {
    int64_t bands = count * ((mrows + R - 1) / R), tcols = (cols + C - 1) / C;
#pragma omp parallel for num_threads(nthreads) if (count * mrows * cols > PARALLEL_MIN) schedule(static)
    for (int64_t band = 0; band < bands; band++) {
        int64_t r0, r1;
        band_rows(band, mrows, R, &r0, &r1);
        for (int64_t tc = 0, t = band * tcols; tc < tcols; tc++, t++) {
            int64_t c0 = tc * C, width = c0 + C < cols ? C : cols - c0;
            const float *ut = u ? u + t * R * C : NULL;
            uint8_t sc;
            if (width == 16)
                sc = block_tile(x, out, codes, r0, r1, c0, 16, cols, d, e4m3, ut, C);
            else if (width == 32)
                sc = block_tile(x, out, codes, r0, r1, c0, 32, cols, d, e4m3, ut, C);
            else
                sc = block_tile(x, out, codes, r0, r1, c0, width, cols, d, e4m3, ut, C);
            if (scale_codes) scale_codes[t] = sc;
        }
    }
}

/* Decode: out = (e2m1(code) · s) · d per element, NaN in a tile whose scale is NaN. */
void fb_block_decode(const uint8_t *codes, const uint8_t *scale_codes, int64_t count, int64_t mrows,
                     int64_t cols, int R, int C, float d, int e4m3, float *out, int nthreads) {
    int64_t bands = count * ((mrows + R - 1) / R), tcols = (cols + C - 1) / C;
#pragma omp parallel for num_threads(nthreads) if (count * mrows * cols > PARALLEL_MIN) schedule(static)
    for (int64_t band = 0; band < bands; band++) {
        int64_t r0, r1;
        band_rows(band, mrows, R, &r0, &r1);
        for (int64_t tc = 0, t = band * tcols; tc < tcols; tc++, t++) {
            int64_t c0 = tc * C, c1 = c0 + C < cols ? c0 + C : cols;
            uint8_t sc = scale_codes[t];
            float s = scale_value(sc, e4m3);
            for (int64_t r = r0; r < r1; r++)
                for (int64_t c = c0; c < c1; c++) out[r * cols + c] = (E2M1_VALUES[codes[r * cols + c] & 15] * s) * d;
        }
    }
}

/* ---- 1-D blocks along a strided axis, without moving it last ------------------------------
 * x viewed as [outer, n, inner]: block (o, b, i) is rows b·B ... of column i of matrix o, in
 * the numbering of the reference's layout (the axis moved last): scale code
 * (o·inner + i)·nb + b, draws B per block from ((o·inner + i)·nb + b)·B. The rows of a band
 * are read contiguously, COLS columns at a time, so the work vectorizes across the blocks. */
#define COLS 64
#define UROWS 16

void fb_block_quantize_axis(const float *x, int64_t outer, int64_t n, int64_t inner, int B, float d, int e4m3,
                            const float *u, float *out, uint8_t *codes, uint8_t *scale_codes, int nthreads) {
    if (inner == 1) { /* the axis is last: tiles of 1 x B */
        fb_block_quantize(x, outer, 1, n, 1, B, d, e4m3, u, out, codes, scale_codes, nthreads);
        return;
    }
    int64_t nb = (n + B - 1) / B, bands = outer * nb;
#pragma omp parallel for num_threads(nthreads) if (outer * n * inner > PARALLEL_MIN) schedule(static)
    for (int64_t band = 0; band < bands; band++) {
        int64_t o = band / nb, b = band - o * nb, r0 = b * B, r1 = r0 + B < n ? r0 + B : n;
        const float *xm = x + o * n * inner;
        float *om = out + o * n * inner;
        uint8_t *km = codes ? codes + o * n * inner : NULL;
        for (int64_t i0 = 0; i0 < inner; i0 += COLS) {
            int64_t w = i0 + COLS < inner ? COLS : inner - i0;
            uint32_t ymax[COLS] = {0}, vmax[COLS] = {0};
            float s[COLS], ur[UROWS][COLS];
            for (int64_t r = r0; r < r1; r++)
                block_scan_row(xm + r * inner + i0, om + r * inner + i0, w, d, ymax, vmax);
            for (int64_t c = 0; c < w; c++) {
                uint8_t sc;
                s[c] = block_scale(ymax[c], vmax[c], e4m3, &sc);
                if (scale_codes) scale_codes[(o * inner + i0 + c) * nb + b] = sc;
            }
            /* Rows UROWS at a time, their draws (one per block and row) first turned into
             * rows, so that the rounding vectorizes. A block's draws are n floats from the
             * next block's: read column by column (one cache line each), not row by row,
             * where the columns' lines, 4 KB apart when n is a multiple of 1024, would
             * evict each other from the cache at every row. */
            for (int64_t q0 = r0; q0 < r1; q0 += UROWS) {
                int64_t q1 = q0 + UROWS < r1 ? q0 + UROWS : r1;
                if (u)
                    for (int64_t c = 0; c < w; c++) {
                        const float *ub = u + ((o * inner + i0 + c) * nb + b) * B + (q0 - r0);
                        for (int64_t r = 0; r < q1 - q0; r++) ur[r][c] = ub[r];
                    }
                for (int64_t r = q0; r < q1; r++)
                    block_round_row(om + r * inner + i0, km ? km + r * inner + i0 : NULL, w, s,
                                    u ? ur[r - q0] : NULL, d);
            }
        }
    }
}

void fb_block_decode_axis(const uint8_t *codes, const uint8_t *scale_codes, int64_t outer, int64_t n,
                          int64_t inner, int B, float d, int e4m3, float *out, int nthreads) {
    if (inner == 1) {
        fb_block_decode(codes, scale_codes, outer, 1, n, 1, B, d, e4m3, out, nthreads);
        return;
    }
    int64_t nb = (n + B - 1) / B, bands = outer * nb;
#pragma omp parallel for num_threads(nthreads) if (outer * n * inner > PARALLEL_MIN) schedule(static)
    for (int64_t band = 0; band < bands; band++) {
        int64_t o = band / nb, b = band - o * nb, r0 = b * B, r1 = r0 + B < n ? r0 + B : n;
        for (int64_t i0 = 0; i0 < inner; i0 += COLS) {
            int64_t w = i0 + COLS < inner ? COLS : inner - i0;
            float s[COLS];
            for (int64_t c = 0; c < w; c++) {
                uint8_t sc = scale_codes[(o * inner + i0 + c) * nb + b];
                s[c] = scale_value(sc, e4m3);
            }
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *k = codes + (o * n + r) * inner + i0;
                float *ov = out + (o * n + r) * inner + i0;
                for (int64_t c = 0; c < w; c++) ov[c] = (E2M1_VALUES[k[c] & 15] * s[c]) * d;
            }
        }
    }
}

/* ---- Philox4x32-10 (Salmon et al., SC 2011): the uniform draws of stochastic rounding ------
 * Draw i is word i % 4 of philox(counter (i / 4, 0, 0, 0), key (k0, k1)) as a float in [0, 1):
 * its top 24 bits times 2**-24. formats/base.py has the same in torch (the oracle). */
#define PHILOX_LANES 64 /* blocks computed side by side: the rounds vectorize across them */

static void philox_blocks(uint32_t first, uint32_t k0, uint32_t k1, uint32_t w[4][PHILOX_LANES]) {
    for (int i = 0; i < PHILOX_LANES; i++) w[0][i] = first + (uint32_t)i, w[1][i] = w[2][i] = w[3][i] = 0;
    for (int r = 0; r < 10; r++) {
        for (int i = 0; i < PHILOX_LANES; i++) {
            uint64_t p0 = (uint64_t)0xD2511F53u * w[0][i], p1 = (uint64_t)0xCD9E8D57u * w[2][i];
            uint32_t c1 = w[1][i], c3 = w[3][i];
            w[0][i] = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
            w[1][i] = (uint32_t)p1;
            w[2][i] = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
            w[3][i] = (uint32_t)p0;
        }
        k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    }
}

void fb_philox_uniform(uint32_t k0, uint32_t k1, int64_t n, float *out, int nthreads) {
    int64_t blocks = (n + 3) / 4, groups = (blocks + PHILOX_LANES - 1) / PHILOX_LANES;
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        uint32_t w[4][PHILOX_LANES];
        int64_t first = g * PHILOX_LANES;
        philox_blocks((uint32_t)first, k0, k1, w);
        float *o = out + 4 * first;
        int count = 4 * (first + PHILOX_LANES) <= n ? 4 * PHILOX_LANES : (int)(n - 4 * first);
        for (int i = 0; i < count; i++) o[i] = (float)(w[i & 3][i >> 2] >> 8) * 0x1p-24f;
    }
}

/* max |x|, on the bit patterns: NaN's are above inf's, so a NaN anywhere gives NaN (like
 * torch.amax). finite_only skips NaN and inf (0 when nothing is left): NVFP4's tensor amax. */
static uint32_t abs_max_range(const uint32_t *restrict x, int64_t m, uint32_t limit) {
    uint32_t amax = 0;
    for (int64_t i = 0; i < m; i++) {
        uint32_t u = x[i] & 0x7FFFFFFFu;
        u &= -(uint32_t)(u < limit); /* a mask, not a select: gcc vectorizes only this form */
        amax = amax > u ? amax : u;
    }
    return amax;
}

float fb_abs_max(const uint32_t *x, int64_t n, int finite_only, int nthreads) {
    uint32_t limit = finite_only ? 0x7F800000u : 0xFFFFFFFFu, amax = 0;
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) reduction(max : amax) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        uint32_t m = abs_max_range(x + lo, hi - lo, limit);
        amax = m > amax ? m : amax;
    }
    return float_of(amax);
}

/* ---- A clipping activation that keeps one bit per element for backward (ReLU, ReLU6) -----
 * y = min(max(x, lo), hi) (NaN stays NaN); bit i set when the gradient passes: unless
 * x <= lo or x >= hi (with an upper bound), as torch's threshold/hardtanh backward, which
 * pass it at x = NaN. */
void fb_clip_with_mask(const float *x, int64_t n, float lo, float hi, int has_hi, float *y, uint8_t *bits,
                       int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo_i, hi_i);
        uint8_t flags[CHUNK + 8] = {0};
        for (int64_t i = lo_i; i < hi_i; i++) {
            float v = x[i], c = v < lo ? lo : v;
            y[i] = c > hi ? hi : c;
            flags[i - lo_i] = (uint8_t)(!(v <= lo) & (!(v >= hi) | !has_hi));
        }
        pack_flags(flags, hi_i - lo_i, bits + lo_i / 8);
    }
}

/* out[i] = g[i] where bit i is set, else +0: eight elements at a time, ANDed with the
 * eight 32-bit masks a byte of bits stands for (a table), which vectorizes */
static uint32_t BYTE_MASKS[256][8];

static void masked_range(const uint32_t *restrict g, int64_t lo, int64_t hi, const uint8_t *restrict bits,
                         uint32_t *restrict out) {
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        const uint32_t *m = BYTE_MASKS[bits[i / 8]];
        for (int k = 0; k < 8; k++) out[i + k] = g[i + k] & m[k];
    }
    for (; i < hi; i++) out[i] = g[i] & BYTE_MASKS[bits[i / 8]][i % 8];
}

void fb_masked(const uint32_t *g, int64_t n, const uint8_t *bits, uint32_t *out, int nthreads) {
    if (!BYTE_MASKS[255][7]) /* filled on first use; every thread would write the same values */
        for (int b = 0; b < 256; b++)
            for (int k = 0; k < 8; k++) BYTE_MASKS[b][k] = (b >> k) & 1 ? 0xFFFFFFFFu : 0u;
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) if (n > PARALLEL_MIN) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        CHUNK_BOUNDS(ch, n, lo, hi);
        masked_range(g, lo, hi, bits, out);
    }
}
