#include "common/threadpool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define NANOCHAT_PAUSE() _mm_pause()
#else
#define NANOCHAT_PAUSE() std::this_thread::yield()
#endif

namespace nanochat {

namespace {

int spin_limit();

// ticket_'s index while a job is being set up: above any task count.
constexpr int64_t kClosed = 0xffffffffLL;

class Pool {
 public:
  explicit Pool(int n) : size_(n < 1 ? 1 : n) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { worker(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return size_; }

  // Returns false (having done nothing) when the pool is already running a job.
  //
  // Tasks are claimed from ticket_ = (job << 32) | next index, so a worker that wakes
  // late (its core lent to another process for a while) finds the job's tasks gone and
  // touches nothing; the caller returns as soon as every task has completed, not when
  // every worker has checked in (waiting for check-ins cut 2-thread decode to a fifth
  // whenever another process held the second core).
  bool try_run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n >= kClosed) return false;  // the index lives in 32 bits of ticket_
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const uint64_t job = ++job_ & 0xffffffffu;
    // Close the ticket before touching fn_ / n_: a worker still holding the previous
    // job's ticket value must fail its exchange, not claim an index of this new job
    // under the old ticket (a stress test caught exactly that: a task run twice).
    ticket_.store((job << 32) | kClosed, std::memory_order_seq_cst);
    fn_ = &fn;
    n_.store(n, std::memory_order_relaxed);
    completed_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    ticket_.store(job << 32, std::memory_order_release);  // publishes fn_, n_ with it
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    while (completed_.load(std::memory_order_acquire) < n) NANOCHAT_PAUSE();
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  // Claims and runs tasks of the job currently in ticket_ until none are left.
  void work() {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t i = int64_t(t & 0xffffffffu);
      // n_ may already belong to a newer job; then ticket_ has changed too and the
      // exchange below fails, so a stale n_ never lets a task run twice.
      if (i >= n_.load(std::memory_order_relaxed)) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                         std::memory_order_acquire))
        continue;  // t reloaded: another thread claimed, or a new job started
      // Task i of this job is ours: the caller waits for it, so fn_ stays valid.
      if (!failed_.load(std::memory_order_relaxed)) {
        try {
          (*fn_)(i);
        } catch (...) {
          std::lock_guard<std::mutex> lk(err_mu_);
          if (!error_) error_ = std::current_exception();
          failed_.store(true, std::memory_order_relaxed);  // skip the remaining tasks
        }
      }
      completed_.fetch_add(1, std::memory_order_acq_rel);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void worker() {
    // Start from the constructor's generation, not a fresh load: a job may be
    // posted before this thread first runs, and it must not be skipped.
    uint64_t seen = 0;
    for (;;) {
      // Spin ~tens of microseconds for the next job, then sleep.
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen && spins < spin_limit()) {
        NANOCHAT_PAUSE();
        ++spins;
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      work();
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the thread whose job is running
  std::mutex mu_;    // guards sleeping
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  uint64_t job_ = 0;                       // caller side only (under busy_)
  std::atomic<uint64_t> ticket_{0};        // (job << 32) | next task index
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<int64_t> n_{0};
  std::atomic<int64_t> completed_{0};
  std::atomic<bool> failed_{false};
  std::mutex err_mu_;
  std::exception_ptr error_;
};

// Pause iterations a worker spins before sleeping (NANOCHAT_SPIN overrides). Short:
// long enough to catch back-to-back kernel calls (decode), short enough not to steal
// the core from torch's own OpenMP threads between ops in training, where a 20000-spin
// default made the C++ BitLinear path 4x slower on 2 cores (`nanochat bench train`).
int spin_limit() {
  static const int n = [] {
    const char* env = std::getenv("NANOCHAT_SPIN");
    return env ? std::atoi(env) : 2000;
  }();
  return n;
}

int default_threads() {
  if (const char* env = std::getenv("NANOCHAT_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? int(hw) : 1;
}

std::mutex g_pool_mu;
std::shared_ptr<Pool> g_pool;

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = std::make_shared<Pool>(default_threads());
  return g_pool;
}

thread_local bool t_inside_job = false;

}  // namespace

int num_threads() { return pool()->size(); }

void set_num_threads(int n) {
  auto fresh = std::make_shared<Pool>(n > 0 ? n : default_threads());
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_pool = std::move(fresh);  // the old pool joins once its last user drops it
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  auto p = pool();
  if (n > 1 && p->size() > 1 && !t_inside_job) {
    // Mark the caller so fn() calling parallel_for runs inline; workers never
    // call into the pool (their fn() would find it busy and run inline).
    t_inside_job = true;
    struct Reset {
      ~Reset() { t_inside_job = false; }
    } reset;
    if (p->try_run(n, fn)) return;
  }
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace nanochat
