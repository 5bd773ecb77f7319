// Streaming exact top-k over blocks of inner-product scores: the selection half of `bict_ray.search`.
//
// The caller (Python, through ctypes) scores a block of queries against a tile of gallery rows with one
// sgemm, then hands the (rows x cols) score tile to `bict_topk_update`, which keeps, per query, a buffer of
// candidates. A score enters only if it ranks above the query's current threshold: the k-th best entry
// after the last compaction. Almost every score fails that test, so the scan is one vectorised compare per
// 16 scores and a branch that is rarely taken; faiss's heap instead compares and branches on every score.
//
// Order: score descending, then tie key ascending (the gallery id, or its position): the same total order
// as the rest of bict_ray, so the top k are exact even when scores tie at the cut.
//
// Plain C ABI, no Python or numpy headers: loaded with ctypes, which releases the GIL during each call,
// so Python threads can scan their own query blocks in parallel.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

struct Entry {
    float score;
    int64_t index;  // gallery position; its tie key is keys[index]
};

// The total order: score descending, then tie key ascending (keys are looked up only on equal scores).
struct RanksBefore {
    const int64_t* keys;
    bool operator()(const Entry& a, const Entry& b) const {
        return a.score > b.score || (a.score == b.score && keys[a.index] < keys[b.index]);
    }
};

#if defined(__x86_64__)
// Keep the k best of buf[0:n] in buf[0:k], the worst of them at buf[k - 1], and return the tie key that goes
// with its score in the admission threshold. The selection compares scores alone and falls back to the
// whole order only when scores equal to the cut lie on both sides of it (rare outside duplicated
// embeddings): then the worst kept entry's key is the bound; otherwise every later score equal to the cut
// may still rank among the k (INT64_MAX: admit them all).
int64_t compact(Entry* buf, int64_t n, int64_t k, const int64_t* keys) {
    std::nth_element(buf, buf + (k - 1), buf + n, [](const Entry& a, const Entry& b) { return a.score > b.score; });
    const float cut = buf[k - 1].score;
    bool straddles = false;
    for (int64_t i = k; i < n; ++i) straddles |= buf[i].score == cut;
    if (!straddles) return INT64_MAX;
    std::nth_element(buf, buf + (k - 1), buf + n, RanksBefore{keys});
    return keys[buf[k - 1].index];
}

// Scanners: from `start` (a multiple of 16), the first 16-score chunk holding a score that reaches
// `threshold`; returns its start (or `cols`) and, in *mask, which of its scores reach it (bit b: score
// start + b). One vector compare per 16 scores with AVX-512, per 8 with AVX2.
__attribute__((target("avx512f"))) int64_t scan_avx512(const float* scores, int64_t cols, int64_t start,
                                                       float threshold, uint32_t* mask) {
    const __m512 t = _mm512_set1_ps(threshold);
    int64_t j = start;
    for (; j + 64 <= cols; j += 64) {
        const __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + j), t, _CMP_GE_OQ);
        const __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + j + 16), t, _CMP_GE_OQ);
        const __mmask16 m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + j + 32), t, _CMP_GE_OQ);
        const __mmask16 m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + j + 48), t, _CMP_GE_OQ);
        if (m0 | m1 | m2 | m3) {
            if (m0) return *mask = m0, j;
            if (m1) return *mask = m1, j + 16;
            if (m2) return *mask = m2, j + 32;
            return *mask = m3, j + 48;
        }
    }
    for (; j + 16 <= cols; j += 16) {
        const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + j), t, _CMP_GE_OQ);
        if (m) return *mask = m, j;
    }
    if (j < cols) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (cols - j)) - 1);
        const __mmask16 m = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, scores + j), t, _CMP_GE_OQ);
        if (m) return *mask = m, j;
    }
    return cols;
}

__attribute__((target("avx2"))) int64_t scan_avx2(const float* scores, int64_t cols, int64_t start,
                                                  float threshold, uint32_t* mask) {
    const __m256 t = _mm256_set1_ps(threshold);
    int64_t j = start;
    for (; j + 16 <= cols; j += 16) {
        const int m0 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + j), t, _CMP_GE_OQ));
        const int m1 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + j + 8), t, _CMP_GE_OQ));
        if (m0 | m1) return *mask = static_cast<uint32_t>(m0 | (m1 << 8)), j;
    }
    uint32_t m = 0;
    for (int64_t i = j; i < cols; ++i) m |= static_cast<uint32_t>(scores[i] >= threshold) << (i - j);
    if (m) return *mask = m, j;
    return cols;
}

#endif

int64_t scan_plain(const float* scores, int64_t cols, int64_t start, float threshold, uint32_t* mask) {
    for (int64_t j = start; j < cols; j += 16) {
        uint32_t m = 0;
        for (int64_t i = j; i < std::min(j + 16, cols); ++i) m |= static_cast<uint32_t>(scores[i] >= threshold) << (i - j);
        if (m) return *mask = m, j;
    }
    return cols;
}

using Scan = int64_t (*)(const float*, int64_t, int64_t, float, uint32_t*);

Scan pick_scan() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return scan_avx512;
    if (__builtin_cpu_supports("avx2")) return scan_avx2;
#endif
    return scan_plain;
}

const Scan scan = pick_scan();

}  // namespace

extern "C" {

// Per-query state, owned by the caller (arrays of `rows` and `rows * capacity` entries):
//   count[r]: entries in the query's buffer; buffer: Entry records, capacity >= k + 1 per query;
//   threshold_score[r], threshold_key[r]: an entry is admitted iff it ranks before this pair
//   (-inf and INT64_MAX at the start; a fresh query's first tile of 2k or more columns then sets the
//   threshold from that tile's group maxima, a shorter one admits everything until the buffer first fills).
// scores: rows x cols, row stride `ld` floats. keys: the tie key of every gallery row, indexed by
// `index_offset + column`. Returns 0, or -1 on bad sizes.
int bict_topk_update(const float* scores, int64_t rows, int64_t cols, int64_t ld, const int64_t* keys,
                     int64_t index_offset, int64_t k, int64_t capacity, int64_t* count, void* buffer,
                     float* threshold_score, int64_t* threshold_key) {
    if (k < 1 || capacity < k + 1 || cols > ld) return -1;
    Entry* entries = static_cast<Entry*>(buffer);
    std::vector<float> scratch;
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = scores + r * ld;
        Entry* buf = entries + r * capacity;
        int64_t n = count[r];
        float t_score = threshold_score[r];
        int64_t t_key = threshold_key[r];
        if (n == 0 && t_score == -INFINITY && cols >= 2 * k) {
            // A fresh query: start from a threshold that at least k scores of this tile reach, instead of
            // admitting every score until the buffer first fills. The k-th largest of the maxima of 2k or
            // more groups of columns is one (k groups each hold a score at or above it), and it costs one
            // pass and a selection among a few hundred values; the k-th score itself costs ten times more.
            const int64_t width = std::min<int64_t>(16, cols / (2 * k));
            scratch.clear();
            for (int64_t first = 0; first + width <= cols; first += width) {
                float top = row[first];
                for (int64_t i = first + 1; i < first + width; ++i) top = std::max(top, row[i]);
                scratch.push_back(top);
            }
            std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
            t_score = scratch[k - 1];  // t_key stays INT64_MAX: every score equal to it is admitted
        }
        uint32_t mask = 0;
        for (int64_t j = scan(row, cols, 0, t_score, &mask); j < cols; j = scan(row, cols, j + 16, t_score, &mask)) {
            for (; mask; mask &= mask - 1) {
                const int64_t index = index_offset + j + __builtin_ctz(mask);
                const float s = row[index - index_offset];
                if (s < t_score) continue;  // the threshold rose since the chunk was scanned
                if (s == t_score && keys[index] >= t_key) continue;
                buf[n++] = Entry{s, index};
                if (n == capacity) {
                    t_key = compact(buf, n, k, keys);
                    t_score = buf[k - 1].score;
                    n = k;
                }
            }
        }
        count[r] = n;
        threshold_score[r] = t_score;
        threshold_key[r] = t_key;
    }
    return 0;
}

// Write each query's best min(k, count) entries, best first, to out_scores / out_indices (rows x k);
// slots beyond the count get -inf and -1.
int bict_topk_finish(int64_t rows, int64_t k, int64_t capacity, const int64_t* keys, const int64_t* count, void* buffer,
                     float* out_scores, int64_t* out_indices) {
    if (k < 1 || capacity < k + 1) return -1;
    Entry* entries = static_cast<Entry*>(buffer);
    const RanksBefore before{keys};
    for (int64_t r = 0; r < rows; ++r) {
        Entry* buf = entries + r * capacity;
        const int64_t n = count[r];
        const int64_t m = std::min(n, k);
        if (m < n) std::nth_element(buf, buf + (m - 1), buf + n, before);
        std::sort(buf, buf + m, before);
        for (int64_t i = 0; i < k; ++i) {
            out_scores[r * k + i] = i < m ? buf[i].score : -INFINITY;
            out_indices[r * k + i] = i < m ? buf[i].index : -1;
        }
    }
    return 0;
}

// The size of one buffer entry, so the caller allocates the buffer with the layout compiled here.
int64_t bict_topk_entry_bytes(void) { return sizeof(Entry); }

}  // extern "C"
