/*
 * rsedge's attention kernel: an onnxruntime custom op, ai.rsedge::GroupQueryAttention (and GroupQueryAttentionInt8
 * for an INT8 per-channel cache), with the inputs, outputs and attributes of com.microsoft::GroupQueryAttention
 * (packed QKV, one KV buffer per layer shared by past and present, rotary from cos/sin caches), float32 activations.
 *
 * Why: onnxruntime's CPU kernel runs one SGEMM of M=1 per *query* head, so a decode step repacks each KV head's
 * whole cache once per query head of its group (7 times for Qwen2-0.5B): at 760 positions that was ~5 ms of a
 * ~22 ms step, against ~1.3 ms to read the cache once. Here a decode step reads each KV head's rows once for all
 * the query heads of its group, in chunks spread over onnxruntime's own intra-op threads, softmax-combined at the
 * end (split-K, as flash-decoding does). A prompt goes in blocks of 16 tokens per task: each chunk's keys are
 * transposed once for the block and multiplied by its queries four rows at a time (a small GEMM), each token's
 * chunks merged as they come (online softmax).
 *
 * Built by rsedge.kernels.build against onnxruntime's C API header (API version 17: KernelContext_ParallelFor).
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define RSEDGE_ORT_API 17
#define CHUNK 256 /* keys per task: a KV head's chunk of a 64-wide head (2 x 64 KB of K and V) stays in L2 */

static const OrtApi *ort;

typedef struct {
  int64_t num_heads, kv_heads, do_rotary, interleaved;
  float scale;
} Gqa;

#define CHECK(expr)                  \
  do {                               \
    OrtStatus *status_ = (expr);     \
    if (status_) return status_;     \
  } while (0)

static OrtStatus *fail(const char *msg) { return ort->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

/* e^x for x <= 0 (scores minus their maximum), vectorizable: 2^n * p(r), r in [-ln2/2, ln2/2], relative error < 2e-7 */
static inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = floorf(x * 1.44269504089f + 0.5f);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  union { uint32_t u; float f; } two_n;
  two_n.u = (uint32_t)((int32_t)n + 127) << 23;
  return p * two_n.f;
}

static void rotate(float *dst, const float *src, int64_t hd, const float *cos_row, const float *sin_row,
                   int64_t half, int interleaved) {
  memcpy(dst, src, (size_t)hd * sizeof(float));
  if (!cos_row) return;
  if (interleaved) {
    for (int64_t i = 0; i < half; i++) {
      float x0 = src[2 * i], x1 = src[2 * i + 1];
      dst[2 * i] = x0 * cos_row[i] - x1 * sin_row[i];
      dst[2 * i + 1] = x1 * cos_row[i] + x0 * sin_row[i];
    }
  } else {
    for (int64_t i = 0; i < half; i++) {
      float x0 = src[i], x1 = src[i + half];
      dst[i] = x0 * cos_row[i] - x1 * sin_row[i];
      dst[i + half] = x1 * cos_row[i] + x0 * sin_row[i];
    }
  }
}

/* One task: query heads [g*G, g*G+G) of batch row b, token s, against keys [c0, c1) of KV head g. */
typedef struct {
  const float *q;         /* rotated queries [B, S, Nq, hd] (an int8 cache's: times its key scales) */
  const void *k, *v;      /* present caches [B, Nkv, T, hd]: float, or int8 when vscale is set */
  const float *vscale;    /* an int8 cache's value scales: [Nkv * hd] per channel, or [1]; NULL: float cache */
  int scale_per_channel;
  float *part;            /* per task: G x (hd + 2): acc, max, sum */
  int64_t S, Nq, Nkv, G, hd, T, chunks;
  const int64_t *past;    /* [B] past length */
  float scale;
  int failed;             /* set by a task that could not get scratch memory */
  float *out;             /* [B, S, Nq * hd]: whole-token tasks write their tokens' outputs here */
} Work;

#if defined(__GNUC__) && !defined(__clang__)
/* GCC's generic vectors (AVX-512, AVX2 or NEON code from one source). Sixteen keys' dot products against one query are
 * sixteen 16-lane partial sums folded pairwise into one vector (4 levels of shuffle + add): no horizontal sum per key,
 * which took ~24 cycles per key and head and was two thirds of the step's attention time. */
#define RSEDGE_FOLD 1
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));
static const i16 L1A = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
static const i16 L1B = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
static const i16 L2A = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
static const i16 L2B = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
static const i16 L3A = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
static const i16 L3B = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
static const i16 L4A = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
static const i16 L4B = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

static inline __attribute__((always_inline)) v16 fold(v16 x, v16 y, i16 lo, i16 hi) {
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

/* q . K[j] for the 16 rows j of K (hd apart); hd a multiple of 16 */
static inline __attribute__((always_inline)) v16 dots16(const float *q, const float *K, const int hd) {
  v16 a[16], b[8], c[4], d[2];
  for (int j = 0; j < 16; j++) {
    v16 s = *(const v16 *)(K + j * hd) * *(const v16 *)q;
    for (int e = 16; e < hd; e += 16) s += *(const v16 *)(K + j * hd + e) * *(const v16 *)(q + e);
    a[j] = s;
  }
  for (int i = 0; i < 8; i++) b[i] = fold(a[2 * i], a[2 * i + 1], L1A, L1B);
  for (int i = 0; i < 4; i++) c[i] = fold(b[2 * i], b[2 * i + 1], L2A, L2B);
  for (int i = 0; i < 2; i++) d[i] = fold(c[2 * i], c[2 * i + 1], L3A, L3B);
  return fold(d[0], d[1], L4A, L4B);
}
#else
#define RSEDGE_FOLD 0
#endif

/* Per query head, over one chunk: softmax of its scores (scaled here) and their weighted sum of V rows into
 * part (acc[HD], max, sum). HD a compile-time constant so the accumulators stay in registers (two: even and odd
 * keys, to halve the FMA latency chain). */
#define SOFTMAX_PV(NAME, HD)                                                                                  \
  static void NAME(float *scores, const float *V, int64_t n, float scale, float *out) {                     \
    float m = -FLT_MAX;                                                                                      \
    int64_t j;                                                                                               \
    _Pragma("omp simd reduction(max : m)") for (j = 0; j < n; j++) {                                         \
      scores[j] *= scale;                                                                                    \
      m = scores[j] > m ? scores[j] : m;                                                                     \
    }                                                                                                        \
    float sum = 0.0f;                                                                                        \
    _Pragma("omp simd reduction(+ : sum)") for (j = 0; j < n; j++) {                                         \
      scores[j] = exp_neg(scores[j] - m);                                                                    \
      sum += scores[j];                                                                                      \
    }                                                                                                        \
    float even[(HD)], odd[(HD)];                                                                             \
    _Pragma("omp simd") for (int64_t d = 0; d < (HD); d++) even[d] = odd[d] = 0.0f;                          \
    for (j = 0; j + 2 <= n; j += 2) {                                                                        \
      const float *v0 = V + j * (HD), *v1 = v0 + (HD);                                                       \
      float p0 = scores[j], p1 = scores[j + 1];                                                              \
      _Pragma("omp simd") for (int64_t d = 0; d < (HD); d++) {                                               \
        even[d] += p0 * v0[d];                                                                               \
        odd[d] += p1 * v1[d];                                                                                \
      }                                                                                                      \
    }                                                                                                        \
    if (j < n) {                                                                                             \
      const float *v0 = V + j * (HD);                                                                        \
      _Pragma("omp simd") for (int64_t d = 0; d < (HD); d++) even[d] += scores[j] * v0[d];                   \
    }                                                                                                        \
    _Pragma("omp simd") for (int64_t d = 0; d < (HD); d++) out[d] = even[d] + odd[d];                        \
    out[(HD)] = m;                                                                                           \
    out[(HD) + 1] = sum;                                                                                     \
  }

SOFTMAX_PV(softmax_pv_64, 64)
SOFTMAX_PV(softmax_pv_128, 128)

static void softmax_pv_any(float *scores, const float *V, int64_t n, int64_t hd, float scale, float *out) {
  float m = -FLT_MAX, sum = 0.0f;
  for (int64_t j = 0; j < n; j++) {
    scores[j] *= scale;
    m = scores[j] > m ? scores[j] : m;
  }
  for (int64_t j = 0; j < n; j++) {
    scores[j] = exp_neg(scores[j] - m);
    sum += scores[j];
  }
  memset(out, 0, (size_t)hd * sizeof(float));
  for (int64_t j = 0; j < n; j++)
    for (int64_t d = 0; d < hd; d++) out[d] += scores[j] * V[j * hd + d];
  out[hd] = m;
  out[hd + 1] = sum;
}

/* The G heads' scores q . K[j] over a chunk, sixteen keys folded at a time where the head width allows. */
static void scores_by_rows(const float *Q, const float *K, int64_t n, int64_t G, int64_t hd, float *scores) {
  for (int64_t h = 0; h < G; h++) {
    const float *qh = Q + h * hd;
    float *sc = scores + h * CHUNK;
    int64_t j = 0;
#if RSEDGE_FOLD
    if (hd == 64)
      for (; j + 16 <= n; j += 16) *(v16 *)(sc + j) = dots16(qh, K + j * 64, 64);
    else if (hd == 128)
      for (; j + 16 <= n; j += 16) *(v16 *)(sc + j) = dots16(qh, K + j * 128, 128);
#endif
    for (; j < n; j++) {
      const float *kj = K + j * hd;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hd; d++) dot += qh[d] * kj[d];
      sc[j] = dot;
    }
  }
}

#if RSEDGE_FOLD
/* A prompt's scores, rows x keys, against the chunk's keys transposed (Kt [hd][ld], ld a multiple of 16, the
 * padding zero): four query rows share each Kt load, sixteen keys a vector, no horizontal sums (a small GEMM). */
static void scores_by_columns(const float *Q, int64_t rows, int64_t hd, const float *Kt, int64_t ld, float *scores) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *q0 = Q + r * hd, *q1 = q0 + hd, *q2 = q1 + hd, *q3 = q2 + hd;
    for (int64_t j = 0; j < ld; j += 16) {
      v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int64_t d = 0; d < hd; d++) {
        v16 k = *(const v16 *)(Kt + d * ld + j);
        a0 += q0[d] * k, a1 += q1[d] * k, a2 += q2[d] * k, a3 += q3[d] * k;
      }
      *(v16 *)(scores + r * CHUNK + j) = a0;
      *(v16 *)(scores + (r + 1) * CHUNK + j) = a1;
      *(v16 *)(scores + (r + 2) * CHUNK + j) = a2;
      *(v16 *)(scores + (r + 3) * CHUNK + j) = a3;
    }
  }
  for (; r < rows; r++)
    for (int64_t j = 0; j < ld; j += 16) {
      v16 a = {0};
      for (int64_t d = 0; d < hd; d++) a += Q[r * hd + d] * *(const v16 *)(Kt + d * ld + j);
      *(v16 *)(scores + r * CHUNK + j) = a;
    }
}

/* keys [n rows][hd] -> Kt [hd][ld] (ld: n rounded up to 16; the padding columns zero) */
static void transpose_keys(const float *K, int64_t n, int64_t hd, float *Kt, int64_t ld) {
  for (int64_t d = 0; d < hd; d++) {
    float *row = Kt + d * ld;
    for (int64_t j = 0; j < n; j++) row[j] = K[j * hd + d];
    for (int64_t j = n; j < ld; j++) row[j] = 0.0f;
  }
}
#endif


/* An int8 chunk's rows as floats, once per task for all its query heads (GCC vectorizes this loop's sign extension
 * and conversion; int8 vectors converted inside the dot products came out scalar, 7x slower than float). */
static void widen(float *dst, const int8_t *src, size_t count) {
#pragma omp simd
  for (size_t i = 0; i < count; i++) dst[i] = (float)src[i];
}

/* Per-thread scratch for widened chunks, grown as needed and kept for the thread's life. */
static _Thread_local float *scratch;
static _Thread_local size_t scratch_floats;

static float *thread_scratch(size_t floats) {
  if (floats > scratch_floats) {
    float *grown = (float *)realloc(scratch, floats * sizeof(float));
    if (!grown) return NULL;
    scratch = grown;
    scratch_floats = floats;
  }
  return scratch;
}

/* The rows of chunk c of KV head g, batch row b, as float pointers: the cache's own for a float cache, else widened
 * into wide (2 * CHUNK * hd floats), once for every token that reads them. Returns how many rows exist (<= CHUNK). */
static int64_t chunk_rows(const Work *w, int64_t b, int64_t g, int64_t c, int64_t limit, float *wide, const float **K,
                          const float **V) {
  int64_t hd = w->hd, c0 = c * CHUNK, n = c0 + CHUNK < limit ? CHUNK : limit - c0;
  size_t at = ((size_t)(b * w->Nkv + g) * w->T + c0) * hd;
  if (n <= 0) return 0;
  if (!w->vscale) {
    *K = (const float *)w->k + at, *V = (const float *)w->v + at;
    return n;
  }
  widen(wide, (const int8_t *)w->k + at, (size_t)(n * hd));
  widen(wide + n * hd, (const int8_t *)w->v + at, (size_t)(n * hd));
  *K = wide, *V = wide + n * hd;
  return n;
}

/* An int8 cache's partials summed int8 values: each channel scaled back (the key scales are in Q already). */
static void unscale_values(const Work *w, int64_t g, int64_t heads, float *part) {
  if (!w->vscale) return;
  int64_t hd = w->hd;
  const float *vs = w->vscale + (w->scale_per_channel ? g * hd : 0);
  for (int64_t h = 0; h < heads; h++)
    for (int64_t d = 0; d < hd; d++) part[h * (hd + 2) + d] *= vs[w->scale_per_channel ? d : 0];
}

/* Token s's partial softmax over the first n rows of a chunk (those it may see) for the G query heads of KV head g,
 * into part (G x (hd + 2): acc, max, sum). */
static void chunk_attend(const Work *w, int64_t b, int64_t g, int64_t s, const float *K, const float *V, int64_t n,
                         float *part, float *scores) {
  int64_t G = w->G, hd = w->hd;
  if (n <= 0) {
    for (int64_t h = 0; h < G; h++) part[h * (hd + 2) + hd] = -FLT_MAX, part[h * (hd + 2) + hd + 1] = 0.0f;
    return;
  }
  const float *Q = w->q + ((size_t)(b * w->S + s) * w->Nq + g * G) * hd;
  scores_by_rows(Q, K, n, G, hd, scores);
  for (int64_t h = 0; h < G; h++) {
    float *out = part + h * (hd + 2), *sc = scores + h * CHUNK;
    switch (hd) {
      case 64: softmax_pv_64(sc, V, n, w->scale, out); break;
      case 128: softmax_pv_128(sc, V, n, w->scale, out); break;
      default: softmax_pv_any(sc, V, n, hd, w->scale, out);
    }
  }
  unscale_values(w, g, G, part);
}

/* A task's scratch (per thread, kept): the scores (G rows; a prompt's task: one per token and head), an int8
 * cache's widened rows, and for a prompt's task the transposed keys, its queries gathered, and the partial softmaxes
 * (one for the chunk, one running per token and head). */
typedef struct {
  float *scores, *wide, *kt, *q, *part, *run;
} Scratch;

static int task_scratch(const Work *w, int prompt, int64_t tokens, Scratch *sc) {
  size_t hd = (size_t)w->hd, G = (size_t)w->G, partial = G * (hd + 2), rows = prompt ? (size_t)tokens * G : G;
  size_t scores = rows * CHUNK, wide = w->vscale ? 2 * CHUNK * hd : 0;
  size_t kt = prompt ? hd * CHUNK : 0, q = prompt ? rows * hd : 0, parts = prompt ? partial * (1 + (size_t)tokens) : 0;
  float *base = thread_scratch(scores + wide + kt + q + parts);
  if (!base) {
    __atomic_store_n(&((Work *)w)->failed, 1, __ATOMIC_RELAXED); /* compute reads the flag */
    return 0;
  }
  sc->scores = base, sc->wide = base + scores, sc->kt = sc->wide + wide, sc->q = sc->kt + kt;
  sc->part = sc->q + q, sc->run = sc->part + partial;
  return 1;
}

/* A decode step (one token): a task per (batch row, KV head, chunk) so that both threads share one token's keys;
 * the chunks' partials are combined after (split-K). */
static void attend_split(void *data, size_t task) {
  const Work *w = (const Work *)data;
  int64_t c = (int64_t)task % w->chunks, rest = (int64_t)task / w->chunks;
  int64_t s = rest % w->S, bg = rest / w->S, g = bg % w->Nkv, b = bg / w->Nkv;
  Scratch sc;
  if (!task_scratch(w, 0, 0, &sc)) return;
  const float *K = NULL, *V = NULL;
  int64_t n = chunk_rows(w, b, g, c, w->past[b] + s + 1, sc.wide, &K, &V);
  chunk_attend(w, b, g, s, K, V, n, w->part + (size_t)task * w->G * (w->hd + 2), sc.scores);
}

/* A prompt (several tokens): a task per (batch row, KV head, block of TOKENS tokens). Each chunk's rows are read
 * (widened) once for the block and stay in cache for its tokens; each token's chunks merge as they
 * come (online softmax), and the task writes the outputs: no partials kept per chunk, whatever the prompt's length. */
#define TOKENS 16
static void attend_whole(void *data, size_t task) {
  const Work *w = (const Work *)data;
  int64_t blocks = (w->S + TOKENS - 1) / TOKENS;
  int64_t blk = (int64_t)task % blocks, bg = (int64_t)task / blocks, g = bg % w->Nkv, b = bg / w->Nkv;
  int64_t G = w->G, hd = w->hd, stride = hd + 2;
  int64_t s0 = blk * TOKENS, s1 = s0 + TOKENS < w->S ? s0 + TOKENS : w->S;
  Scratch sc;
  if (!task_scratch(w, 1, s1 - s0, &sc)) return;
  for (int64_t i = 0; i < (s1 - s0) * G; i++) {
    memset(sc.run + i * stride, 0, (size_t)hd * sizeof(float));
    sc.run[i * stride + hd] = -FLT_MAX, sc.run[i * stride + hd + 1] = 0.0f;
  }
  /* the block's queries side by side: rows (token, head), what the columns' product takes */
  for (int64_t s = s0; s < s1; s++)
    memcpy(sc.q + (s - s0) * G * hd, w->q + ((size_t)(b * w->S + s) * w->Nq + g * G) * hd,
           (size_t)(G * hd) * sizeof(float));
  int64_t last = w->past[b] + s1; /* rows the block's last token sees */
  for (int64_t c = 0; c * CHUNK < last; c++) {
    const float *K = NULL, *V = NULL;
    int64_t n = chunk_rows(w, b, g, c, last, sc.wide, &K, &V);
#if RSEDGE_FOLD
    int64_t ld = (n + 15) / 16 * 16;
    transpose_keys(K, n, hd, sc.kt, ld);
    scores_by_columns(sc.q, (s1 - s0) * G, hd, sc.kt, ld, sc.scores);
#else
    for (int64_t s = s0; s < s1; s++)
      scores_by_rows(sc.q + (s - s0) * G * hd, K, n, G, hd, sc.scores + (s - s0) * G * CHUNK);
#endif
    for (int64_t s = s0; s < s1; s++) {
      int64_t visible = w->past[b] + s + 1 - c * CHUNK;
      if (visible <= 0) continue;
      int64_t nv = visible < n ? visible : n;
      for (int64_t h = 0; h < G; h++) {
        float *sc_row = sc.scores + ((s - s0) * G + h) * CHUNK, *out = sc.part + h * stride;
        switch (hd) {
          case 64: softmax_pv_64(sc_row, V, nv, w->scale, out); break;
          case 128: softmax_pv_128(sc_row, V, nv, w->scale, out); break;
          default: softmax_pv_any(sc_row, V, nv, hd, w->scale, out);
        }
      }
      unscale_values(w, g, G, sc.part);
      for (int64_t h = 0; h < G; h++) {
        float *r = sc.run + ((s - s0) * G + h) * stride;
        const float *p = sc.part + h * stride;
        float m = p[hd] > r[hd] ? p[hd] : r[hd];
        float fr = r[hd + 1] == 0.0f ? 0.0f : expf(r[hd] - m), fp = expf(p[hd] - m);
        for (int64_t d = 0; d < hd; d++) r[d] = r[d] * fr + p[d] * fp;
        r[hd + 1] = r[hd + 1] * fr + p[hd + 1] * fp;
        r[hd] = m;
      }
    }
  }
  for (int64_t s = s0; s < s1; s++)
    for (int64_t h = 0; h < G; h++) {
      const float *r = sc.run + ((s - s0) * G + h) * stride;
      float *o = w->out + ((size_t)(b * w->S + s) * w->Nq + g * G + h) * hd;
      for (int64_t d = 0; d < hd; d++) o[d] = r[d] / r[hd + 1];
    }
}

static int64_t dims_of(const OrtValue *value, int64_t *dims, size_t max_rank, ONNXTensorElementDataType *type,
                       OrtStatus **status) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  size_t rank = 0;
  *status = ort->GetTensorTypeAndShape(value, &info);
  if (*status) return -1;
  *status = ort->GetDimensionsCount(info, &rank);
  if (!*status && rank <= max_rank) *status = ort->GetDimensions(info, dims, rank);
  if (!*status && type) *status = ort->GetTensorElementType(info, type);
  ort->ReleaseTensorTypeAndShapeInfo(info);
  if (*status) return -1;
  return rank <= max_rank ? (int64_t)rank : -1;
}

/* Round to nearest and saturate, as onnxruntime's quantized cache does (checked against it by the tests). */
static inline int8_t quantize(float x, float scale) {
  float q = nearbyintf(x / scale);
  return (int8_t)(q > 127.0f ? 127.0f : q < -128.0f ? -128.0f : q);
}

static OrtStatus *input(OrtKernelContext *ctx, size_t count, size_t i, const OrtValue **value) {
  *value = NULL;
  return i < count ? ort->KernelContext_GetInput(ctx, i, value) : NULL;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Gqa *a = (const Gqa *)kernel;
  const OrtValue *qv, *kv, *pkv, *pvv, *slv, *cosv, *sinv, *ksv, *vsv, *extra;
  size_t n_in = 0;
  CHECK(ort->KernelContext_GetInputCount(ctx, &n_in));
  CHECK(input(ctx, n_in, 0, &qv));
  CHECK(input(ctx, n_in, 1, &kv));
  if (kv) return fail("ai.rsedge GroupQueryAttention: only packed QKV (no separate key/value inputs)");
  CHECK(input(ctx, n_in, 3, &pkv));
  CHECK(input(ctx, n_in, 4, &pvv));
  CHECK(input(ctx, n_in, 5, &slv));
  CHECK(input(ctx, n_in, 7, &cosv));
  CHECK(input(ctx, n_in, 8, &sinv));
  for (size_t i = 9; i <= 11; i++) {
    CHECK(input(ctx, n_in, i, &extra));
    if (extra) return fail("ai.rsedge GroupQueryAttention: position_ids, attention_bias and head_sink are not implemented");
  }
  CHECK(input(ctx, n_in, 12, &ksv));
  CHECK(input(ctx, n_in, 13, &vsv));
  if (!qv || !pkv || !pvv || !slv) return fail("ai.rsedge GroupQueryAttention: past_key, past_value and seqlens_k are required");
  if (a->do_rotary && (!cosv || !sinv)) return fail("ai.rsedge GroupQueryAttention: do_rotary needs cos_cache and sin_cache");

  OrtStatus *st = NULL;
  int64_t qd[3], pd[4], sd[1], cd[2], kd_[1], vd_[1];
  ONNXTensorElementDataType qt, pt, pvt;
  if (dims_of(qv, qd, 3, &qt, &st) != 3) return st ? st : fail("ai.rsedge GroupQueryAttention: query must be [B, S, D]");
  if (dims_of(pkv, pd, 4, &pt, &st) != 4) return st ? st : fail("ai.rsedge GroupQueryAttention: past_key must be [B, Nkv, P, hd]");
  int64_t pvd[4];
  if (dims_of(pvv, pvd, 4, &pvt, &st) != 4 || memcmp(pvd, pd, sizeof pd) != 0)
    return st ? st : fail("ai.rsedge GroupQueryAttention: past_value must have past_key's shape");
  if (qt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return fail("ai.rsedge GroupQueryAttention: float32 query only");
  int int8 = pt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if ((!int8 && pt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) || pvt != pt)
    return fail("ai.rsedge GroupQueryAttention: a float32 or int8 cache, the same for keys and values");
  if (int8 != (ksv != NULL && vsv != NULL))
    return fail("ai.rsedge GroupQueryAttention: an int8 cache comes with k_scale and v_scale, a float one without");
  if (dims_of(slv, sd, 1, NULL, &st) != 1) return st ? st : fail("ai.rsedge GroupQueryAttention: seqlens_k must be [B]");
  int64_t B = qd[0], S = qd[1], Nq = a->num_heads, Nkv = a->kv_heads, hd = pd[3], P = pd[2];
  if (pd[0] != B || pd[1] != Nkv || sd[0] != B || qd[2] != (Nq + 2 * Nkv) * hd)
    return fail("ai.rsedge GroupQueryAttention: query, past and seqlens_k shapes disagree with the heads");
  const float *kscale = NULL, *vscale = NULL;
  int per_channel = 0;
  if (int8) {
    if (dims_of(ksv, kd_, 1, NULL, &st) != 1 || dims_of(vsv, vd_, 1, NULL, &st) != 1 || kd_[0] != vd_[0] ||
        (kd_[0] != 1 && kd_[0] != Nkv * hd))
      return st ? st : fail("ai.rsedge GroupQueryAttention: k_scale / v_scale must be [1] or [kv_num_heads * head_size]");
    per_channel = kd_[0] != 1;
    CHECK(ort->GetTensorMutableData((OrtValue *)ksv, (void **)&kscale));
    CHECK(ort->GetTensorMutableData((OrtValue *)vsv, (void **)&vscale));
  }
  int64_t half = 0, max_pos = 0;
  const float *cos_cache = NULL, *sin_cache = NULL;
  if (a->do_rotary) {
    if (dims_of(cosv, cd, 2, NULL, &st) != 2) return st ? st : fail("ai.rsedge GroupQueryAttention: cos_cache must be 2-D");
    half = cd[1];
    max_pos = cd[0];
    if (2 * half > hd) return fail("ai.rsedge GroupQueryAttention: rotary wider than the head");
    CHECK(ort->GetTensorMutableData((OrtValue *)cosv, (void **)&cos_cache));
    CHECK(ort->GetTensorMutableData((OrtValue *)sinv, (void **)&sin_cache));
  }

  const float *q_in;
  const char *past_k, *past_v;
  const int32_t *seqlens;
  CHECK(ort->GetTensorMutableData((OrtValue *)qv, (void **)&q_in));
  CHECK(ort->GetTensorMutableData((OrtValue *)pkv, (void **)&past_k));
  CHECK(ort->GetTensorMutableData((OrtValue *)pvv, (void **)&past_v));
  CHECK(ort->GetTensorMutableData((OrtValue *)slv, (void **)&seqlens));

  int64_t *past = (int64_t *)malloc((size_t)B * sizeof(int64_t));
  if (!past) return ort->CreateStatus(ORT_FAIL, "ai.rsedge GroupQueryAttention: out of memory");
  int64_t T = P;
  for (int64_t b = 0; b < B; b++) {
    past[b] = (int64_t)seqlens[b] + 1 - S;
    if (past[b] < 0 || past[b] > P) {
      free(past);
      return fail("ai.rsedge GroupQueryAttention: seqlens_k outside the past buffer");
    }
    if (past[b] + S > T) T = past[b] + S;
    if (a->do_rotary && past[b] + S > max_pos) {
      free(past);
      return fail("ai.rsedge GroupQueryAttention: a position beyond the rotary cache");
    }
  }

  int64_t od[3] = {B, S, Nq * hd}, kd[4] = {B, Nkv, T, hd};
  size_t esz = int8 ? 1 : sizeof(float), row_bytes = (size_t)hd * esz;
  OrtValue *ov, *pko, *pvo;
  float *out;
  char *k, *v;
  OrtStatus *err = NULL;
#define TRY(expr)           \
  if (!err) {               \
    err = (expr);           \
  }
  TRY(ort->KernelContext_GetOutput(ctx, 0, od, 3, &ov));
  TRY(ort->KernelContext_GetOutput(ctx, 1, kd, 4, &pko));
  TRY(ort->KernelContext_GetOutput(ctx, 2, kd, 4, &pvo));
  TRY(ort->GetTensorMutableData(ov, (void **)&out));
  TRY(ort->GetTensorMutableData(pko, (void **)&k));
  TRY(ort->GetTensorMutableData(pvo, (void **)&v));
  if (err) {
    free(past);
    return err;
  }
  /* Shared buffer (the runtime binds past and present to one allocation): rows are appended in place. Otherwise the
   * past rows are copied first, as onnxruntime's kernel does. */
  if (k != past_k || v != past_v) {
    for (int64_t bh = 0; bh < B * Nkv; bh++) {
      int64_t rows = past[bh / Nkv];
      memcpy(k + (size_t)bh * T * row_bytes, past_k + (size_t)bh * P * row_bytes, (size_t)rows * row_bytes);
      memcpy(v + (size_t)bh * T * row_bytes, past_v + (size_t)bh * P * row_bytes, (size_t)rows * row_bytes);
      /* rows past the new tokens are zero, as onnxruntime's kernel leaves them */
      memset(k + ((size_t)bh * T + rows) * row_bytes, 0, (size_t)(T - rows) * row_bytes);
      memset(v + ((size_t)bh * T + rows) * row_bytes, 0, (size_t)(T - rows) * row_bytes);
    }
  }

  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) longest = past[b] + S > longest ? past[b] + S : longest;
  int64_t G = Nq / Nkv, chunks = (longest + CHUNK - 1) / CHUNK;
  int whole = S > 1; /* a prompt: one task per token; a decode step: one per chunk, combined after */
  size_t tasks = whole ? (size_t)(B * Nkv * ((S + TOKENS - 1) / TOKENS)) : (size_t)(B * Nkv * chunks);
  float *q = (float *)malloc((size_t)(B * S * Nq * hd + hd) * sizeof(float)); /* + one row of scratch */
  float *part = whole ? NULL : (float *)malloc(tasks * (size_t)(G * (hd + 2)) * sizeof(float));
  if (!q || (!whole && !part)) {
    free(past), free(q), free(part);
    return ort->CreateStatus(ORT_FAIL, "ai.rsedge GroupQueryAttention: out of memory");
  }
  float *rotated = q + (size_t)(B * S * Nq * hd);
  for (int64_t b = 0; b < B; b++) {
    for (int64_t s = 0; s < S; s++) {
      int64_t pos = past[b] + s;
      const float *row = q_in + (size_t)(b * S + s) * (Nq + 2 * Nkv) * hd;
      const float *c = a->do_rotary ? cos_cache + pos * half : NULL, *sn = a->do_rotary ? sin_cache + pos * half : NULL;
      for (int64_t h = 0; h < Nq; h++) {
        float *qh = q + ((size_t)(b * S + s) * Nq + h) * hd;
        rotate(qh, row + h * hd, hd, c, sn, half, (int)a->interleaved);
        if (int8) /* q . (k_int8 * k_scale) = (q * k_scale) . k_int8: the key scales go into the query once */
          for (int64_t d = 0; d < hd; d++) qh[d] *= kscale[per_channel ? (h / G) * hd + d : 0];
      }
      for (int64_t h = 0; h < Nkv; h++) {
        size_t at = ((size_t)(b * Nkv + h) * T + pos) * hd;
        const float *vrow = row + (Nq + Nkv + h) * hd;
        if (!int8) {
          rotate((float *)k + at, row + (Nq + h) * hd, hd, c, sn, half, (int)a->interleaved);
          memcpy((float *)v + at, vrow, (size_t)hd * sizeof(float));
          continue;
        }
        rotate(rotated, row + (Nq + h) * hd, hd, c, sn, half, (int)a->interleaved);
        for (int64_t d = 0; d < hd; d++) {
          int64_t ch = per_channel ? h * hd + d : 0;
          ((int8_t *)k)[at + d] = quantize(rotated[d], kscale[ch]);
          ((int8_t *)v)[at + d] = quantize(vrow[d], vscale[ch]);
        }
      }
    }
  }

  Work w = {q, k, v, vscale, per_channel, part, S, Nq, Nkv, G, hd, T, chunks, past, a->scale, 0, out};
  err = ort->KernelContext_ParallelFor(ctx, whole ? attend_whole : attend_split, tasks, 0, &w);
  if (!err && w.failed) err = ort->CreateStatus(ORT_FAIL, "ai.rsedge GroupQueryAttention: out of memory");
  if (!err && !whole) {
    /* Combine the chunks' partial softmaxes: out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M). */
    for (int64_t b = 0; b < B; b++)
      for (int64_t s = 0; s < S; s++)
        for (int64_t g = 0; g < Nkv; g++)
          for (int64_t h = 0; h < G; h++) {
            size_t first = (size_t)(((b * Nkv + g) * S + s) * chunks);
            float M = -FLT_MAX, L = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
              float m = part[(first + c) * G * (hd + 2) + h * (hd + 2) + hd];
              M = m > M ? m : M;
            }
            float *o = out + ((size_t)(b * S + s) * Nq + g * G + h) * hd;
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int64_t c = 0; c < chunks; c++) {
              const float *acc = part + (first + c) * G * (hd + 2) + h * (hd + 2);
              if (acc[hd + 1] == 0.0f) continue;
              float f = expf(acc[hd] - M);
              L += acc[hd + 1] * f;
              for (int64_t d = 0; d < hd; d++) o[d] += acc[d] * f;
            }
            for (int64_t d = 0; d < hd; d++) o[d] /= L;
          }
  }
  free(past), free(q), free(part);
  return err;
}

/* ---- the custom op's schema and life cycle ---- */

static float attr_float(const OrtKernelInfo *info, const char *name, float fallback) {
  float value = fallback;
  OrtStatus *st = ort->KernelInfoGetAttribute_float(info, name, &value);
  if (st) ort->ReleaseStatus(st), value = fallback;
  return value;
}

static int64_t attr_int(const OrtKernelInfo *info, const char *name, int64_t fallback) {
  int64_t value = fallback;
  OrtStatus *st = ort->KernelInfoGetAttribute_int64(info, name, &value);
  if (st) ort->ReleaseStatus(st), value = fallback;
  return value;
}

static OrtStatus *ORT_API_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                             void **kernel) {
  (void)op, (void)api;
  Gqa a;
  a.num_heads = attr_int(info, "num_heads", 0);
  a.kv_heads = attr_int(info, "kv_num_heads", 0);
  a.do_rotary = attr_int(info, "do_rotary", 0);
  a.interleaved = attr_int(info, "rotary_interleaved", 0);
  if (a.num_heads <= 0 || a.kv_heads <= 0 || a.num_heads % a.kv_heads)
    return fail("ai.rsedge GroupQueryAttention: num_heads must be a positive multiple of kv_num_heads");
  if (attr_int(info, "kv_cache_bit_width", 8) != 8)
    return fail("ai.rsedge GroupQueryAttention: an 8-bit quantized cache only");
  if (attr_int(info, "local_window_size", -1) != -1 || attr_float(info, "softcap", 0.0f) != 0.0f ||
      attr_int(info, "smooth_softmax", 0) != 0)
    return fail("ai.rsedge GroupQueryAttention: local windows, softcap and smooth softmax are not implemented");
  a.scale = attr_float(info, "scale", 0.0f);
  Gqa *k = (Gqa *)malloc(sizeof(Gqa));
  if (!k) return ort->CreateStatus(ORT_FAIL, "ai.rsedge GroupQueryAttention: out of memory");
  *k = a;
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL destroy_kernel(void *kernel) { free(kernel); }

static OrtStatus *ORT_API_CALL compute_v2(void *kernel, OrtKernelContext *ctx) {
  const Gqa *a = (const Gqa *)kernel;
  if (a->scale == 0.0f) { /* resolved at the first call: head_size is known from the inputs only */
    const OrtValue *pk = NULL;
    OrtStatus *st = NULL;
    int64_t pd[4];
    CHECK(ort->KernelContext_GetInput(ctx, 3, &pk));
    if (!pk || dims_of(pk, pd, 4, NULL, &st) != 4) return st ? st : fail("ai.rsedge GroupQueryAttention: past_key must be [B, Nkv, P, hd]");
    Gqa local = *a;
    local.scale = 1.0f / sqrtf((float)pd[3]);
    return compute(&local, ctx);
  }
  return compute(kernel, ctx);
}

static OrtCustomOp gqa_op, gqa_int8_op;

/* Two ops: onnxruntime types a custom op's outputs from its inputs' fixed types, so the int8 cache has its own name. */
static const char *ORT_API_CALL op_name(const OrtCustomOp *op) {
  return op == &gqa_int8_op ? "GroupQueryAttentionInt8" : "GroupQueryAttention";
}
static const char *ORT_API_CALL op_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static size_t ORT_API_CALL n_inputs(const OrtCustomOp *op) { (void)op; return 14; }
static size_t ORT_API_CALL n_outputs(const OrtCustomOp *op) { (void)op; return 3; }

/* GroupQueryAttention's inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
 * cos_cache, sin_cache, position_ids, attention_bias, head_sink, k_scale, v_scale; the caches (3, 4 in; 1, 2 out)
 * float32, or int8 for GroupQueryAttentionInt8. */
static ONNXTensorElementDataType cache_type(const OrtCustomOp *op) {
  return op == &gqa_int8_op ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t i) {
  if (i == 3 || i == 4) return cache_type(op);
  if (i == 5 || i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (i == 9) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t i) {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : cache_type(op);
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp *op, size_t i) {
  (void)op;
  return (i == 1 || i == 2 || i >= 7) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp *op, size_t i) {
  (void)op, (void)i;
  return INPUT_OUTPUT_REQUIRED;
}

static OrtMemType ORT_API_CALL input_memory(const OrtCustomOp *op, size_t i) {
  (void)op, (void)i;
  return OrtMemTypeDefault;
}

static int ORT_API_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL since(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL until(const OrtCustomOp *op) { (void)op; return INT_MAX; }

static OrtCustomOpDomain *domain; /* one per process: sessions keep referencing it after registration returns */
static OrtStatus *init_status;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void describe(OrtCustomOp *op) {
  op->version = RSEDGE_ORT_API;
  op->GetName = op_name;
  op->GetExecutionProviderType = op_provider;
  op->GetInputType = input_type;
  op->GetInputTypeCount = n_inputs;
  op->GetOutputType = output_type;
  op->GetOutputTypeCount = n_outputs;
  op->KernelDestroy = destroy_kernel;
  op->GetInputCharacteristic = input_kind;
  op->GetOutputCharacteristic = output_kind;
  op->GetInputMemoryType = input_memory;
  op->GetVariadicInputMinArity = one;
  op->GetVariadicInputHomogeneity = one;
  op->GetVariadicOutputMinArity = one;
  op->GetVariadicOutputHomogeneity = one;
  op->CreateKernelV2 = create_kernel;
  op->KernelComputeV2 = compute_v2;
  op->GetStartVersion = since;
  op->GetEndVersion = until;
}

static void init(void) {
  describe(&gqa_op);
  describe(&gqa_int8_op);
  init_status = ort->CreateCustomOpDomain("ai.rsedge", &domain);
  if (!init_status) init_status = ort->CustomOpDomain_Add(domain, &gqa_op);
  if (!init_status) init_status = ort->CustomOpDomain_Add(domain, &gqa_int8_op);
}

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  const OrtApi *api = base->GetApi(RSEDGE_ORT_API);
  if (!api) {
    const OrtApi *v1 = base->GetApi(1);
    return v1->CreateStatus(ORT_FAIL, "rsedge kernels need onnxruntime >= 1.17 (C API version 17)");
  }
  ort = api;
  pthread_once(&init_once, init);
  if (init_status) return ort->CreateStatus(ORT_FAIL, ort->GetErrorMessage(init_status));
  return ort->AddCustomOpDomain(options, domain);
}
