/* y = x W^T (+ bias) for generation on a CPU: azgpt.cpu_kernel builds this file with the
 * machine's C compiler (-O3 -march=native -fopenmp) and calls it through ctypes.
 *
 * W is stored in panels of P output rows: panel p holds, for every input index k, the P
 * weights of outputs p*P .. p*P+P-1 side by side (float32, or int8 with one float32 scale per
 * output), so one pass over a panel reads its weights in order, once. For each block of up
 * to 8 rows of x, a panel's P outputs are kept in 2 x 8 vector accumulators: every weight
 * loaded is used by 8 rows. Each output is a plain sum over k in order, whatever the number
 * of rows: a row's result does not depend on the rows beside it (bitwise).
 *
 * Threads: OpenMP over (panel, row block), the runtime PyTorch loaded (one libgomp in the
 * process), `threads` of them. */

#include <stdint.h>
#include <string.h>

#define P 32  /* outputs per panel: two vectors of 16 floats */
#define MB 8  /* rows of x per block */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load_f32(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 load_i8(const int8_t *p) {
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
typedef float v8 __attribute__((vector_size(32)));
static inline v16 load_i8(const int8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    v8 lo = (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    v8 hi = (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    v16 r;
    memcpy(&r, &lo, sizeof lo);
    memcpy((char *)&r + sizeof lo, &hi, sizeof hi);
    return r;
}
#else
static inline v16 load_i8(const int8_t *p) {
    v16 r;
    for (int i = 0; i < 16; i++) r[i] = (float)p[i];
    return r;
}
#endif

/* acc[m][0..1] = sum over k of x[m][k] * panel[k][0..31], for ROWS rows of x. */
#define PANEL(ROWS, LOAD)                                                    \
    do {                                                                     \
        v16 a0[ROWS], a1[ROWS];                                              \
        for (int m = 0; m < ROWS; m++) a0[m] = a1[m] = (v16){0};             \
        for (int64_t k = 0; k < K; k++) {                                    \
            v16 w0 = LOAD(w + k * P), w1 = LOAD(w + k * P + 16);             \
            for (int m = 0; m < ROWS; m++) {                                 \
                float s = xr[m * K + k];                                     \
                a0[m] += s * w0;                                             \
                a1[m] += s * w1;                                             \
            }                                                                \
        }                                                                    \
        for (int m = 0; m < ROWS; m++) {                                     \
            memcpy(acc + m * P, &a0[m], sizeof(v16));                        \
            memcpy(acc + m * P + 16, &a1[m], sizeof(v16));                   \
        }                                                                    \
    } while (0)

#define ALL_ROWS(LOAD)                                                       \
    switch (rows) {                                                          \
    case 1: PANEL(1, LOAD); break;                                           \
    case 2: PANEL(2, LOAD); break;                                           \
    case 3: PANEL(3, LOAD); break;                                           \
    case 4: PANEL(4, LOAD); break;                                           \
    case 5: PANEL(5, LOAD); break;                                           \
    case 6: PANEL(6, LOAD); break;                                           \
    case 7: PANEL(7, LOAD); break;                                           \
    default: PANEL(8, LOAD); break;                                          \
    }

static void store(float *y, const float *acc, int rows, int64_t N, int64_t n0, const float *scale,
                  const float *bias) {
    int width = N - n0 < P ? (int)(N - n0) : P;
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < width; j++) {
            float v = acc[m * P + j];
            if (scale) v *= scale[n0 + j];
            if (bias) v += bias[n0 + j];
            y[m * N + n0 + j] = v;
        }
}

/* x (M, K) float32, w panels (ceil(N / P), K, P), scale (N) or NULL, bias (N) or NULL,
 * y (M, N) float32. */
void azgpt_linear_f32(const float *x, int64_t M, int64_t K, const float *wp, int64_t N,
                      const float *bias, float *y, int threads) {
    int64_t panels = (N + P - 1) / P, blocks = (M + MB - 1) / MB;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *w = wp + p * K * P, *xr = x + b * MB * K;
            int rows = M - b * MB < MB ? (int)(M - b * MB) : MB;
            float acc[MB * P];
            ALL_ROWS(load_f32)
            store(y + b * MB * N, acc, rows, N, p * P, NULL, bias);
        }
}

void azgpt_linear_i8(const float *x, int64_t M, int64_t K, const int8_t *wp, const float *scale,
                     int64_t N, const float *bias, float *y, int threads) {
    int64_t panels = (N + P - 1) / P, blocks = (M + MB - 1) / MB;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t b = 0; b < blocks; b++) {
            const int8_t *w = wp + p * K * P;
            const float *xr = x + b * MB * K;
            int rows = M - b * MB < MB ? (int)(M - b * MB) : MB;
            float acc[MB * P];
            ALL_ROWS(load_i8)
            store(y + b * MB * N, acc, rows, N, p * P, scale, bias);
        }
}

/* The panel width, so the Python side lays weights out as this file reads them. */
int azgpt_linear_panel(void) { return P; }

/* Which int8 conversion this build holds: 512 (AVX-512), 256 (AVX2) or 0 (plain C). */
int azgpt_linear_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}
