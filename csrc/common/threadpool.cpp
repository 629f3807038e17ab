#include "common/threadpool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "nanochat/error.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#define NANOCHAT_PAUSE() _mm_pause()
#else
#define NANOCHAT_PAUSE() std::this_thread::yield()
#endif

namespace nanochat {

namespace {

int spin_limit();

thread_local bool t_inside_job = false;
thread_local int t_threads = 0;  // ThreadCountScope's count; 0: the library-wide one

// ticket_'s index while a job is being set up: above any task count.
constexpr int64_t kClosed = 0xffffffffLL;

class Pool {
 public:
  // Throws nanochat::Error when a worker cannot be started, after stopping and joining
  // the ones that did (left running, they would wait on cv_ forever and std::thread's
  // destructor would abort the process).
  explicit Pool(int n) : size_(n < 1 ? 1 : n) {
    workers_.reserve(size_t(size_ - 1));
    try {
      for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { worker(); });
    } catch (const std::exception& e) {
      const size_t started = workers_.size();
      stop();
      throw Error("thread pool: could not start thread " + std::to_string(started + 2) +
                  " of " + std::to_string(size_) + " (" + e.what() +
                  "); lower the thread count (NANOCHAT_NUM_THREADS, set_num_threads)");
    }
  }

  ~Pool() { stop(); }

  int size() const { return size_; }

  // Runs a job; the caller owns the pool for the call (Registry), so jobs never overlap.
  //
  // Tasks are claimed from ticket_ = (job << 32) | next index, so a worker that wakes
  // late (its core lent to another process for a while) finds the job's tasks gone and
  // touches nothing; the caller returns as soon as every task has completed, not when
  // every worker has checked in (waiting for check-ins cut 2-thread decode to a fifth
  // whenever another process held the second core).
  void run(int64_t n, const std::function<void(int64_t)>& fn) {
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
  }

 private:
  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

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
    t_inside_job = true;  // fn() calling parallel_for runs inline on this worker
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
  std::mutex mu_;    // guards sleeping
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  uint64_t job_ = 0;                       // caller side only
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
  int n = 0;
  if (const char* env = std::getenv("NANOCHAT_NUM_THREADS")) n = std::atoi(env);
  if (n <= 0) n = int(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  return n < kMaxThreads ? n : kMaxThreads;
}

// Workers across all pools at most; a caller that would pass it waits for a pool.
constexpr int kMaxTotalWorkers = 4 * kMaxThreads;

// The pools: idle ones by size, taken by one parallel_for at a time.
class Registry {
 public:
  int threads() {
    std::lock_guard<std::mutex> lk(mu_);
    if (threads_ == 0) threads_ = default_threads();
    return threads_;
  }

  void set_threads(int n) {
    if (n > kMaxThreads)
      throw Error("set_num_threads: " + std::to_string(n) + " threads is more than the " +
                  std::to_string(kMaxThreads) + " allowed");
    const int want = n > 0 ? n : default_threads();
    release(acquire(want));  // starts the threads now, so a failure is reported here
    std::lock_guard<std::mutex> lk(mu_);
    threads_ = want;
  }

  std::unique_ptr<Pool> acquire(int n) {
    std::vector<std::unique_ptr<Pool>> evicted;  // destroyed (joined) outside the lock
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      for (size_t i = 0; i < idle_.size(); ++i)
        if (idle_[i]->size() == n) {
          std::unique_ptr<Pool> p = std::move(idle_[i]);
          idle_.erase(idle_.begin() + long(i));
          return p;
        }
      // Idle pools of other sizes make room first.
      for (size_t i = 0; i < idle_.size() && workers_ + n - 1 > kMaxTotalWorkers;) {
        if (idle_[i]->size() != n) {
          workers_ -= idle_[i]->size() - 1;
          evicted.push_back(std::move(idle_[i]));
          idle_.erase(idle_.begin() + long(i));
        } else {
          ++i;
        }
      }
      if (workers_ + n - 1 <= kMaxTotalWorkers) break;
      released_.wait(lk);
    }
    workers_ += n - 1;
    lk.unlock();
    evicted.clear();
    try {
      return std::make_unique<Pool>(n);
    } catch (...) {
      lk.lock();
      workers_ -= n - 1;
      throw;
    }
  }

  void release(std::unique_ptr<Pool> p) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      idle_.push_back(std::move(p));
    }
    released_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable released_;
  int threads_ = 0;  // 0: not yet read from the environment
  int workers_ = 0;  // in every pool, idle or in use
  std::vector<std::unique_ptr<Pool>> idle_;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: workers may outlive static teardown
  return *r;
}

}  // namespace

int num_threads() { return registry().threads(); }

void set_num_threads(int n) { registry().set_threads(n); }

ThreadCountScope::ThreadCountScope(int n) : prev_(t_threads) { t_threads = n > 0 ? n : 0; }
ThreadCountScope::~ThreadCountScope() { t_threads = prev_; }

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  const int threads = t_threads > 0 ? t_threads : num_threads();
  // The task index lives in 32 bits of the pool's ticket.
  if (n > 1 && threads > 1 && !t_inside_job && n < kClosed) {
    Registry& r = registry();
    std::unique_ptr<Pool> p = r.acquire(threads);
    // Mark the caller so fn() calling parallel_for runs inline.
    t_inside_job = true;
    struct Release {
      Registry& r;
      std::unique_ptr<Pool>& p;
      ~Release() {
        t_inside_job = false;
        r.release(std::move(p));
      }
    } release{r, p};
    p->run(n, fn);
    return;
  }
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace nanochat
