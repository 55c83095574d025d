// Decode attention over a KV cache on CPU: an XLA FFI handler (parallel/kernels/cpu_decode.py
// builds, loads and calls it; dimension letters: core/__init__.py).
//
// Why: XLA:CPU runs the batched products of decode attention (every row and kv head: a
// [G, D] x [D, C] and a [G, C] x [C, D]) one after another on one thread, ~7 us each,
// whatever their size; on bench/decode.py's 58M model that was ~12 ms of a ~27 ms step.
// Here each (row, kv head) pair is one work item, spread over XLA's intra-op thread pool,
// and each reads only the slots up to the last one its queries may see.
//
// Per device (inside the ring's shard_map), for every row b and kv head k:
//   q        [B, K, R, D] float32   R = G * L query rows; row r is query l = r % L
//   keys     [B, K, D, C]           float32, bfloat16 (or its uint16 bits) or int8
//   values   [B, K, C, D]           as the keys
//   k_scale, v_scale [B, K, C] float32: slot c holds values * scale (a scaled cache);
//                                   read only when `scaled`
//   kv_pos   [B, C] int32           the token position in each slot
//   q_pos    [B, L] int32           the queries' positions (`empty`: a padding query)
//   limit    [B] int32              slots of the row that may be read (0: none)
// A slot is visible to a query when kv_pos <= q_pos and, with a window, kv_pos > q_pos -
// window or kv_pos < sinks. Outputs, as the ring's merge wants them (ring.cache_attention):
//   row_max     [B, K, R] float32   max over visible slots of scale * q.k (-inf: none)
//   numerator   [B, K, R, D] float32  sum_c exp(s_c - max) v_c   (0 where none)
//   denominator [B, K, R] float32   sum_c exp(s_c - max)
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The stored value as float32, for each cache dtype.
inline float Widen(float x) { return x; }
inline float Widen(int8_t x) { return static_cast<float>(x); }
inline float Widen(uint16_t bits) {  // bfloat16: the high half of a float32
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// exp(x) for x <= 0 (scores minus their maximum), 0 below float32's range: 2^(x log2 e)
// as 2^n times a degree-6 polynomial of the fraction (relative error ~2e-7), written so
// that the compiler vectorizes a loop of it.
#pragma omp declare simd
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  float t = x * 1.44269504088896341f;
  float n = std::nearbyint(t);
  float f = t - n;  // [-0.5, 0.5]
  float p = 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Problem {
  int64_t rows, kv_heads, q_rows, head_dim, slots, queries;
  float scale;
  int64_t window, sinks, empty;
  bool scaled;
  const float* q;
  const void* keys;
  const void* values;
  const float* k_scale;
  const float* v_scale;
  const int32_t* kv_pos;
  const int32_t* q_pos;
  const int32_t* limit;
  float* row_max;
  float* numerator;
  float* denominator;
};

// Tiles, measured on a 2-core Zen 4 (bench/decode.py's shapes, 8 layers of 32 rows x 4 kv
// heads x 256 bf16 slots, one thread): slots 32 / dims 32 / rows 4: 9.0 ms; 64/64/4: 6.0;
// 128/64/2: 4.6-5.0 (longer contiguous runs of each key row).
constexpr int64_t kSlotTile = 128;  // slots per score tile (8 vectors of 16 floats)
constexpr int64_t kDimTile = 64;    // head dims per value tile
constexpr int64_t kRowBlock = 2;    // query rows sharing one widened tile

// scores[r, 0:kSlotTile] = sum_d q[r, d] keys[d, 0:kSlotTile] for NR rows (strides: q
// rows D apart, key rows C apart, score rows `used` apart), the sums in registers.
template <int NR, typename T>
void ScoreTile(const float* q, int64_t D, const T* keys, int64_t C, float* scores,
                 int64_t used) {
  float acc[NR][kSlotTile] = {};
  for (int64_t d = 0; d < D; ++d) {
    float widened[kSlotTile];
    for (int64_t i = 0; i < kSlotTile; ++i) widened[i] = Widen(keys[d * C + i]);
    for (int r = 0; r < NR; ++r) {
      const float qd = q[r * D + d];
      for (int64_t i = 0; i < kSlotTile; ++i) acc[r][i] += qd * widened[i];
    }
  }
  for (int r = 0; r < NR; ++r) std::memcpy(scores + r * used, acc[r], sizeof(acc[r]));
}

// out[r, 0:kDimTile] += sum_c weights[r, c] values[c, 0:kDimTile] for NR rows (strides:
// weight rows `used` apart, value rows D apart, out rows D apart), the sums in registers.
template <int NR, typename T>
void ValueTile(const float* weights, int64_t used, const T* values, int64_t D, float* out,
                 int64_t out_stride) {
  float acc[NR][kDimTile] = {};
  for (int64_t c = 0; c < used; ++c) {
    float widened[kDimTile];
    for (int64_t i = 0; i < kDimTile; ++i) widened[i] = Widen(values[c * D + i]);
    for (int r = 0; r < NR; ++r) {
      const float weight = weights[r * used + c];
      for (int64_t i = 0; i < kDimTile; ++i) acc[r][i] += weight * widened[i];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int64_t i = 0; i < kDimTile; ++i) out[r * out_stride + i] += acc[r][i];
  }
}

// f(std::integral_constant<int, NR>) for the NR = `rows` (1 or kRowBlock) of a row block.
template <typename F>
void WithRowBlock(int64_t rows, F&& f) {
  static_assert(kRowBlock == 2);
  if (rows == 1) return f(std::integral_constant<int, 1>{});
  return f(std::integral_constant<int, 2>{});
}

// One (row b, kv head k) pair. scores: scratch of q_rows * slots floats.
template <typename T>
void AttendPair(const Problem& p, int64_t pair, float* scores, float* widened) {
  const int64_t b = pair / p.kv_heads;
  const int64_t R = p.q_rows, D = p.head_dim, C = p.slots, L = p.queries;
  const float* q = p.q + pair * R * D;
  const T* keys = static_cast<const T*>(p.keys) + pair * D * C;
  const T* values = static_cast<const T*>(p.values) + pair * C * D;
  const int32_t* kv_pos = p.kv_pos + b * C;
  const int32_t* q_pos = p.q_pos + b * L;
  float* row_max = p.row_max + pair * R;
  float* numerator = p.numerator + pair * R * D;
  float* denominator = p.denominator + pair * R;

  // Read slots [0, used): up to the last one any query of the row may see (a padding
  // query, at position `empty`, is left out of that bound; it sees what the others see).
  int64_t used = std::min<int64_t>(std::max<int32_t>(p.limit[b], 0), C);
  int32_t latest = std::numeric_limits<int32_t>::min();
  for (int64_t l = 0; l < L; ++l) {
    if (q_pos[l] < p.empty) latest = std::max(latest, q_pos[l]);
  }
  while (used > 0 && kv_pos[used - 1] > latest) --used;
  for (int64_t r = 0; r < R; ++r) {
    row_max[r] = -std::numeric_limits<float>::infinity();
    denominator[r] = 0.0f;
  }
  std::fill(numerator, numerator + R * D, 0.0f);
  if (used == 0) return;

  // scores[r, c] = q[r] . keys[:, c]: tiles of kSlotTile slots by up to kRowBlock rows
  // held in registers over d; the slots past the last whole tile one row of D at a time.
  const int64_t tiled = used - used % kSlotTile;
  for (int64_t c0 = 0; c0 < tiled; c0 += kSlotTile) {
    for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
      WithRowBlock(std::min<int64_t>(kRowBlock, R - r0), [&](auto rows) {
        ScoreTile<rows()>(q + r0 * D, D, keys + c0, C, scores + r0 * used + c0, used);
      });
    }
  }
  if (tiled < used) {
    for (int64_t r = 0; r < R; ++r) std::fill(scores + r * used + tiled, scores + (r + 1) * used, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const T* key_row = keys + d * C;
      for (int64_t c = tiled; c < used; ++c) widened[c] = Widen(key_row[c]);
      for (int64_t r = 0; r < R; ++r) {
        const float qd = q[r * D + d];
        float* s = scores + r * used;
        for (int64_t c = tiled; c < used; ++c) s[c] += qd * widened[c];
      }
    }
  }
  const float* k_scale = p.scaled ? p.k_scale + pair * C : nullptr;
  const float* v_scale = p.scaled ? p.v_scale + pair * C : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * used;
    // Visible: pos <= query and, with a window, pos > query - window or pos < sinks
    // (without a window both of those hold for every position).
    const int32_t query_pos = q_pos[r % L];
    const int32_t start = p.window ? static_cast<int32_t>(std::max<int64_t>(
        static_cast<int64_t>(query_pos) - p.window, std::numeric_limits<int32_t>::min()))
                                   : std::numeric_limits<int32_t>::min();
    const int32_t sinks = p.window ? static_cast<int32_t>(p.sinks)
                                   : std::numeric_limits<int32_t>::max();
    if (k_scale) {
#pragma omp simd
      for (int64_t c = 0; c < used; ++c) s[c] *= k_scale[c];
    }
    float best = neg_inf;
#pragma omp simd reduction(max : best)
    for (int64_t c = 0; c < used; ++c) {
      const int32_t pos = kv_pos[c];
      const bool seen = (pos <= query_pos) & ((pos > start) | (pos < sinks));
      const float value = seen ? s[c] * p.scale : neg_inf;
      s[c] = value;
      best = std::max(best, value);
    }
    row_max[r] = best;
    if (best == neg_inf) {  // sees no slot: weights all 0
      std::fill(s, s + used, 0.0f);
      continue;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < used; ++c) {
      const float weight = ExpNonPositive(s[c] - best);  // -inf - best -> 0
      total += weight;
      s[c] = weight;
    }
    denominator[r] = total;
    if (v_scale) {
#pragma omp simd
      for (int64_t c = 0; c < used; ++c) s[c] *= v_scale[c];
    }
  }
  // numerator[r] = sum_c weight[r, c] values[c]: tiles of kDimTile of D by up to
  // kRowBlock rows held in registers over the slots (or, for D not a multiple of the
  // tile, the values widened one slot at a time).
  if (D % kDimTile == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += kDimTile) {
      for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
        WithRowBlock(std::min<int64_t>(kRowBlock, R - r0), [&](auto rows) {
          ValueTile<rows()>(scores + r0 * used, used, values + d0, D,
                              numerator + r0 * D + d0, D);
        });
      }
    }
    return;
  }
  for (int64_t c = 0; c < used; ++c) {
    const T* value_row = values + c * D;
    for (int64_t d = 0; d < D; ++d) widened[d] = Widen(value_row[d]);
    for (int64_t r = 0; r < R; ++r) {
      const float weight = scores[r * used + c];
      float* out = numerator + r * D;
      for (int64_t d = 0; d < D; ++d) out[d] += weight * widened[d];
    }
  }
}

// The pairs, taken one at a time by the calling thread and by helpers scheduled on XLA's
// pool. A helper that starts after every pair is taken does nothing, so the caller never
// waits on a task that has not started (no deadlock when the pool is busy, or is us).
struct Work {
  Problem problem;
  ffi::DataType dtype;
  int64_t pairs;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

template <typename T>
void RunPairs(Work& work) {
  const Problem& p = work.problem;
  const int64_t scratch = p.q_rows * p.slots;
  std::vector<float> scores(scratch), widened(std::max(p.slots, p.head_dim));
  int64_t mine = 0;
  for (int64_t pair; (pair = work.next.fetch_add(1)) < work.pairs;) {
    AttendPair<T>(p, pair, scores.data(), widened.data());
    ++mine;
  }
  if (mine && work.done.fetch_add(mine) + mine == work.pairs) {
    std::lock_guard<std::mutex> lock(work.mutex);
    work.finished.notify_all();
  }
}

void Run(Work& work) {
  switch (work.dtype) {
    case ffi::DataType::F32: return RunPairs<float>(work);
    case ffi::DataType::BF16:
    case ffi::DataType::U16: return RunPairs<uint16_t>(work);
    case ffi::DataType::S8: return RunPairs<int8_t>(work);
    default: return;
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys,
                           ffi::AnyBuffer values, ffi::Buffer<ffi::F32> k_scale,
                           ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> kv_pos,
                           ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> limit,
                           float scale, int64_t window, int64_t sinks, int64_t empty,
                           bool scaled,
                           ffi::ResultBuffer<ffi::F32> row_max,
                           ffi::ResultBuffer<ffi::F32> numerator,
                           ffi::ResultBuffer<ffi::F32> denominator) {
  auto q_dims = q.dimensions();
  auto k_dims = keys.dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 4 || values.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("cpu_decode: q, keys and values must be rank 4");
  }
  const ffi::DataType dtype = keys.element_type();
  if (values.element_type() != dtype ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 &&
       dtype != ffi::DataType::U16 && dtype != ffi::DataType::S8)) {
    return ffi::Error::InvalidArgument(
        "cpu_decode: keys and values must share one of float32, bfloat16, uint16, int8");
  }
  if (dtype == ffi::DataType::S8 && !scaled) {
    return ffi::Error::InvalidArgument("cpu_decode: an int8 cache needs its scales");
  }
  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  p.rows = q_dims[0];
  p.kv_heads = q_dims[1];
  p.q_rows = q_dims[2];
  p.head_dim = q_dims[3];
  p.slots = k_dims[3];
  p.queries = q_pos.dimensions()[1];
  p.scale = scale;
  p.window = window;
  p.sinks = sinks;
  p.empty = empty;
  p.scaled = scaled;
  p.q = q.typed_data();
  p.keys = keys.untyped_data();
  p.values = values.untyped_data();
  p.k_scale = k_scale.typed_data();
  p.v_scale = v_scale.typed_data();
  p.kv_pos = kv_pos.typed_data();
  p.q_pos = q_pos.typed_data();
  p.limit = limit.typed_data();
  p.row_max = row_max->typed_data();
  p.numerator = numerator->typed_data();
  p.denominator = denominator->typed_data();
  work->dtype = dtype;
  work->pairs = p.rows * p.kv_heads;
  if (work->pairs == 0) return ffi::Error::Success();

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->pairs - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work] { Run(*work); });
  }
  Run(*work);
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == work->pairs; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RinglmCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::AnyBuffer>()          // keys
                                  .Arg<ffi::AnyBuffer>()          // values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // limit
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("sinks")
                                  .Attr<int64_t>("empty")
                                  .Attr<bool>("scaled")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // row_max
                                  .Ret<ffi::Buffer<ffi::F32>>()   // numerator
                                  .Ret<ffi::Buffer<ffi::F32>>()); // denominator
