// Exact ranks over a whole score row: the ranking half of exact mAP in `bict_ray.retrieval.metrics`.
//
// Exact AP needs, for every positive of a query, its rank among all gallery items: one plus the number of items
// that rank above it (a higher score, or an equal score and a smaller id; the query's own entry never counts).
// Sorting the whole row costs O(W log W) and several passes over memory. Here the positives ("needles", a small
// share of the row) are sorted instead, into score buckets fine enough that most hold none or one of them. One
// pass counts the items in each bucket; an item whose bucket holds no needle ranks above every needle of later
// buckets and below every needle of earlier ones, so its count is enough, and only the items of buckets that hold
// needles (a small share) are compared exactly with those needles. Prefix sums then give every needle its count
// of items above it. O(W + P + buckets) a row, one read of the row.
//
// Buckets are a monotone map of the score (a float subtraction and multiplication, each monotone in IEEE
// rounding), so an item in an earlier bucket than a needle scores strictly higher, and one in a later bucket
// strictly lower. The order is the same total order as the rest of bict_ray (score descending, then id
// ascending), so the ranks are exact, ties included.
//
// Plain C ABI, no Python or numpy headers, loaded with ctypes; rows are spread over `threads` std::threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

namespace {

struct Needle {
    float score;
    int64_t id;
    int64_t slot;  // where its answer goes
};

// Does an item (score s, id) rank above the needle?
inline bool above(float s, int64_t id, const Needle& n) { return s > n.score || (s == n.score && id < n.id); }

const auto needle_before = [](const Needle& a, const Needle& b) { return above(a.score, a.id, b); };

constexpr int64_t BUCKETS_PER_NEEDLE = 4;

enum Status { OK = 0, BAD_ARGUMENTS = -1, NOT_A_NUMBER = -2 };

// One thread's reusable buffers and the ranking of one row against its needles.
class Ranker {
  public:
    // For each needle of needles[0:n] (any order), the number of items of row[0:width] (ids[i] for item i;
    // the item at column `own` left out, -1 for none) that rank above it, written to counts[needle.slot];
    // needles come back sorted in rank order. A needle that is itself one of the row's items (columns[slot] >= 0,
    // its score the row's) is not placed as an item: the needles above another are counted from the rank order,
    // which spares the scan the exact comparisons every such item would need with its own needle. Returns OK or
    // NOT_A_NUMBER.
    int count_above(const float* row, int64_t width, const int64_t* ids, int64_t own, Needle* needles, int64_t n,
                    int64_t* counts, const int64_t* columns) {
        if (n == 0) return OK;
        float hi = -INFINITY, lo = INFINITY;
        for (int64_t k = 0; k < n; ++k) {
            if (std::isnan(needles[k].score)) return NOT_A_NUMBER;
            hi = std::max(hi, needles[k].score);
            lo = std::min(lo, needles[k].score);
        }
        // BUCKETS_PER_NEEDLE buckets a needle over [lo, hi] (as many a column at most: a narrow shard gains
        // nothing from a table wider than itself), numbered from 1; bucket 0 takes the scores above hi and bucket
        // `last` those below lo, neither holding a needle; bucket last + 1 takes the items not to be placed.
        const int64_t inner = std::max<int64_t>(std::min<int64_t>({BUCKETS_PER_NEEDLE * n, BUCKETS_PER_NEEDLE * width,
                                                                    int64_t{1} << 26}), 1);
        const int64_t last = inner + 1;
        float scale = static_cast<float>(inner) / (hi - lo);
        if (!std::isfinite(scale)) scale = 0;  // all needles tie (or the range is too narrow): one bucket
        const float top = static_cast<float>(last);
        const auto bucket_of = [=](float s) {
            // monotone in s; in [1, inner + 1] for s in [lo, hi] (inner + 1 only by rounding at lo: clamped)
            const float v = (hi - s) * scale + 1.0f;
            return s > hi ? int64_t{0} : s < lo ? last : std::min(static_cast<int64_t>(std::min(v, top)), inner);
        };

        // Needles sorted by bucket (a counting sort: after the scatter, end_[b] is where bucket b ends), then
        // exactly within each bucket that holds more than one.
        end_.assign(last + 1, 0);
        bucket_.resize(n);
        for (int64_t k = 0; k < n; ++k) ++end_[bucket_[k] = static_cast<int32_t>(bucket_of(needles[k].score))];
        for (int64_t b = 0, total = 0; b <= last; ++b) total += std::exchange(end_[b], static_cast<int32_t>(total));
        // Needles handed over in rank order (bict_sort_positives) need no sort within their buckets.
        bool in_order = true;
        for (int64_t k = 1; k < n && in_order; ++k) in_order = needle_before(needles[k - 1], needles[k]);
        sorted_.resize(n);
        for (int64_t k = 0; k < n; ++k) sorted_[end_[bucket_[k]]++] = needles[k];
        // hist_: two interleaved item counters a bucket (item i adds to copy i % 2, so that items of one bucket in
        // a row do not wait on each other's increment); a bucket holding needles starts its counters at INT32_MIN,
        // and that sign marks the items that need exact comparisons.
        hist_.assign(2 * (last + 2), 0);
        for (int64_t b = 0, begin = 0; b <= last; begin = end_[b++]) {
            const int64_t size = end_[b] - begin;
            if (size > 1 && !in_order) std::sort(sorted_.begin() + begin, sorted_.begin() + end_[b], needle_before);
            if (size) hist_[2 * b] = hist_[2 * b + 1] = INT32_MIN;
        }

        // One pass over the items, without a branch: count each in its bucket and collect the columns of those in
        // a bucket holding needles (a small share with fine buckets: 6% of the items on bench/evaluate.py's data).
        is_needle_.assign(width, 0);
        for (int64_t k = 0; k < n; ++k)
            if (columns[needles[k].slot] >= 0) is_needle_[columns[needles[k].slot]] = 1;
        const uint8_t* is_needle = is_needle_.data();
        contested_.resize(width);
        int32_t* hist = hist_.data();
        int32_t* contested = contested_.data();
        int64_t m = 0;
        bool nan = false;
        for (int64_t i = 0; i < width; ++i) {
            const float s = row[i];
            nan |= s != s;
            const int64_t b = is_needle[i] || i == own ? last + 1 : bucket_of(s);
            contested[m] = static_cast<int32_t>(i);
            m += hist[2 * b + (i & 1)]++ < 0 && b <= last;
        }
        if (nan) return NOT_A_NUMBER;

        // placed[j]: the items whose first needle ranked below them is j (n: none). An item of a bucket without
        // needles is placed at the bucket's end; a contested one by exact comparison with its bucket's needles.
        placed_.assign(n + 1, 0);
        int32_t* placed = placed_.data();
        for (int64_t b = 0; b <= last; ++b)
            if (hist[2 * b] >= 0) placed[end_[b]] += hist[2 * b] + hist[2 * b + 1];
        const Needle* sorted = sorted_.data();
        for (int64_t t = 0; t < m; ++t) {
            const int64_t i = contested[t], b = bucket_of(row[i]), id = ids[i];
            const float s = row[i];
            int64_t j = b ? end_[b - 1] : 0;
            while (j < end_[b] && !above(s, id, sorted[j])) ++j;
            ++placed[j];
        }
        int64_t total = 0;
        for (int64_t j = 0; j < n; ++j) {
            total += placed[j];
            counts[sorted[j].slot] = total;
            total += columns[sorted[j].slot] >= 0;  // an item itself: above every later needle
        }
        std::copy(sorted_.begin(), sorted_.end(), needles);
        return OK;
    }

    std::vector<Needle> needles;  // the caller's per-row needle buffer
    std::vector<int64_t> counts;  // and its per-row answers
    std::vector<int64_t> columns;  // and its needles' columns

  private:
    std::vector<int32_t> end_, bucket_, hist_, contested_, placed_;
    std::vector<uint8_t> is_needle_;
    std::vector<Needle> sorted_;
};

// Run body(ranker, row) for rows [0, rows) on up to `threads` threads, each with its own Ranker; the first
// failing status wins.
template <typename Body>
int for_rows(int64_t rows, int64_t threads, Body body) {
    const int64_t workers = std::max<int64_t>(1, std::min(threads, rows));
    std::vector<int> status(workers, OK);
    const auto work = [&](int64_t w) {
        Ranker ranker;
        for (int64_t r = w; r < rows && status[w] == OK; r += workers) status[w] = body(ranker, r);
    };
    if (workers == 1) {
        work(0);
    } else {
        std::vector<std::thread> pool;
        for (int64_t w = 0; w < workers; ++w) pool.emplace_back(work, w);
        for (auto& t : pool) t.join();
    }
    for (int s : status)
        if (s != OK) return s;
    return OK;
}

}  // namespace

extern "C" {

// For each needle, the number of row items ranked above it (exact mAP over shards, pass 2).
// scores: rows x width, row stride ld floats; ids (width,): the items' ids; own (rows,): each row's own column
// or -1. Row r's needles are entries offsets[r] - offsets[0] .. offsets[r + 1] - offsets[0] of needle_scores,
// needle_ids and needle_cols; their counts go to the same entries of counts. A needle that is one of the row's
// items (needle_cols >= 0: its column) is compared by the row's own score for it, so that it never outranks
// itself if the pass that found it scored it a bit differently. Returns 0, or a negative status.
int bict_count_above(const float* scores, int64_t rows, int64_t width, int64_t ld, const int64_t* ids,
                     const int64_t* own, const int64_t* offsets, const float* needle_scores,
                     const int64_t* needle_ids, const int64_t* needle_cols, int64_t* counts, int64_t threads) {
    if (rows < 0 || width < 0 || width > ld || width > INT32_MAX || threads < 1) return BAD_ARGUMENTS;
    const int64_t base = rows ? offsets[0] : 0;
    return for_rows(rows, threads, [&](Ranker& ranker, int64_t r) {
        const int64_t begin = offsets[r] - base, n = offsets[r + 1] - offsets[r];
        if (n < 0) return static_cast<int>(BAD_ARGUMENTS);
        const float* row = scores + r * ld;
        const int64_t* columns = needle_cols + begin;
        ranker.needles.resize(n);
        for (int64_t k = 0; k < n; ++k) {
            if (columns[k] >= width || (columns[k] >= 0 && columns[k] == own[r])) return static_cast<int>(BAD_ARGUMENTS);
            ranker.needles[k] = Needle{columns[k] >= 0 ? row[columns[k]] : needle_scores[begin + k], needle_ids[begin + k], k};
        }
        return ranker.count_above(row, width, ids, own[r], ranker.needles.data(), n, counts + begin, columns);
    });
}

// Sort each query's positives (CSR: offsets (queries + 1,), scores, ids) in place into rank order: score
// descending, then id ascending. Returns 0, or a negative status.
int bict_sort_positives(int64_t queries, const int64_t* offsets, float* scores, int64_t* ids, int64_t threads) {
    if (queries < 0 || threads < 1) return BAD_ARGUMENTS;
    return for_rows(queries, threads, [&](Ranker& ranker, int64_t q) {
        const int64_t begin = offsets[q], n = offsets[q + 1] - offsets[q];
        if (n < 0) return static_cast<int>(BAD_ARGUMENTS);
        auto& needles = ranker.needles;
        needles.resize(n);
        for (int64_t k = 0; k < n; ++k) needles[k] = Needle{scores[begin + k], ids[begin + k], k};
        std::sort(needles.begin(), needles.end(), needle_before);
        for (int64_t k = 0; k < n; ++k) scores[begin + k] = needles[k].score, ids[begin + k] = needles[k].id;
        return static_cast<int>(OK);
    });
}

// Exact AP, best rank (1-based; `no_hit` when none) and positive count of each row, the positives being the
// items whose code equals the row's (codes (width,), query_codes (rows,); the own column excluded).
// Other arguments as bict_count_above. Returns 0, or a negative status.
int bict_exact_ap(const float* scores, int64_t rows, int64_t width, int64_t ld, const int64_t* ids,
                  const int32_t* codes, const int32_t* query_codes, const int64_t* own, int64_t no_hit, double* ap,
                  int64_t* best_rank, int64_t* positives, int64_t threads) {
    if (rows < 0 || width < 0 || width > ld || width > INT32_MAX || threads < 1) return BAD_ARGUMENTS;
    return for_rows(rows, threads, [&](Ranker& ranker, int64_t r) {
        const float* row = scores + r * ld;
        const int32_t code = query_codes[r];
        auto& needles = ranker.needles;
        auto& columns = ranker.columns;
        needles.clear();
        columns.clear();
        for (int64_t i = 0; i < width; ++i) {
            if (codes[i] == code && i != own[r]) {
                needles.push_back(Needle{row[i], ids[i], int64_t(needles.size())});
                columns.push_back(i);
            }
        }
        const int64_t n = static_cast<int64_t>(needles.size());
        auto& above = ranker.counts;
        above.resize(n);
        const int status = ranker.count_above(row, width, ids, own[r], needles.data(), n, above.data(), columns.data());
        if (status != OK) return status;
        // The j-th positive in rank order (needles now are) stands at rank above + 1 and adds j / rank to AP.
        double sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(j + 1) / static_cast<double>(above[needles[j].slot] + 1);
        ap[r] = n ? sum / static_cast<double>(n) : 0.0;
        best_rank[r] = n ? above[needles[0].slot] + 1 : no_hit;
        positives[r] = n;
        return static_cast<int>(OK);
    });
}

}  // extern "C"
