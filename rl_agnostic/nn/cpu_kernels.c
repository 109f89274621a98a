/* Fused elementwise CPU kernels for training with dropout (loaded by rl_agnostic/nn/native.py).
 *
 * Dropout's keep mask is a pure function of (seed, element index): bit string
 *     bits(i) = mix(mix(lo(i) ^ k0) ^ (k1 + hi(i)·φ)),   k0, k1 = the seed's two 32-bit halves,
 * with `mix` the lowbias32 integer hash (full avalanche), and element i is kept iff
 * bits(i) >= threshold = round(p·2³²). Backward regenerates the mask from the seed instead of
 * storing it, and every loop is plain 32-bit integer and float arithmetic that the compiler
 * vectorizes (8 lanes with AVX2). One pass over memory where torch needs four to six (draw,
 * compare, convert, scale, multiply; GELU and its backward separately).
 *
 * GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)),  GELU'(x) = Φ(x) + x·φ(x),  φ(x) = exp(-x²/2)/√(2π).
 * erf is Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), the approximation torch's own
 * vectorized CPU GELU uses; exp is Cephes' expf (relative error ~1e-7).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* exp(-x²/2), shared by Φ and φ: Cephes' expf for the non-positive argument a. */
static inline float gauss(float x) {
    const float a = -0.5f * x * x;
    int32_t n = (int32_t)(a * 1.44269504088896341f - 0.5f);  /* round(a / ln 2) */
    n = n < -126 ? -126 : n;  /* 2^n stays a normal float; a < -87 gives 0 below */
    const float r = a - (float)n * 0.693359375f + (float)n * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);  /* 2^n */
    return (q * r * r + r + 1.0f) * two_n * (float)(a >= -87.0f);
}

/* Φ(x) = ½(1 + erf(x/√2)), given g = gauss(x). */
static inline float normal_cdf(float x, float g) {
    const float t = 1.0f / (1.0f + 0.3275911f * 0.70710678118654752f * fabsf(x));
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                       + t * (-1.453152027f + t * 1.061405429f))));
    const float half_erf_abs = 0.5f - 0.5f * poly * g;
    return 0.5f + copysignf(half_erf_abs, x);
}

/* Runs the body (the variadic argument) for every element index i in [0, n) with keep = 1/(1-p)
 * if element i survives, else 0 (a multiplier: no branch, so the loop vectorizes). The loop is
 * split at multiples of 2³² so that the inner counter is 32-bit (vectorizable). */
#define FOR_EACH_KEEP(n, seed, threshold, scale, ...)                                      \
    do {                                                                                   \
        const uint32_t k0_ = (uint32_t)(seed), k1_ = (uint32_t)((uint64_t)(seed) >> 32);   \
        const float scale_ = (scale);                                                      \
        for (int64_t b_ = 0; b_ < (n); b_ += (int64_t)1 << 32) {                           \
            const int64_t rest_ = (n) - b_;                                                \
            const uint32_t count_ = rest_ > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)rest_; \
            const uint32_t salt_ = k1_ + (uint32_t)(b_ >> 32) * 0x9E3779B9U;               \
            _Pragma("omp simd")                                                            \
            for (uint32_t j_ = 0; j_ < count_; ++j_) {                                     \
                const int64_t i = b_ + j_;                                                 \
                const float keep = scale_                                                  \
                    * (float)(mix32(mix32(j_ ^ k0_) ^ salt_) >= (threshold));              \
                __VA_ARGS__;                                                               \
            }                                                                              \
        }                                                                                  \
    } while (0)

/* y = x · keep / (1-p); also backward, with the same seed. */
void rla_dropout(const float *x, float *y, int64_t n, uint64_t seed,
                 uint32_t threshold, float scale) {
    FOR_EACH_KEEP(n, seed, threshold, scale, y[i] = x[i] * keep);
}

/* y = GELU(h) · keep / (1-p). */
void rla_gelu_dropout(const float *h, float *y, int64_t n, uint64_t seed,
                      uint32_t threshold, float scale) {
    FOR_EACH_KEEP(n, seed, threshold, scale, {
        const float x = h[i];
        y[i] = x * normal_cdf(x, gauss(x)) * keep;
    });
}

/* dh = dy · keep / (1-p) · GELU'(h). */
void rla_gelu_dropout_backward(const float *dy, const float *h, float *dh, int64_t n,
                               uint64_t seed, uint32_t threshold, float scale) {
    FOR_EACH_KEEP(n, seed, threshold, scale, {
        const float x = h[i], g = gauss(x);
        dh[i] = dy[i] * keep * (normal_cdf(x, g) + x * 0.39894228040143268f * g);
    });
}
