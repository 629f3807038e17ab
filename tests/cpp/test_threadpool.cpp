// The kernel thread pool: coverage, exceptions, nesting and concurrent callers.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "common/threadpool.h"
#include "nanochat/error.hpp"
#include "test_util.h"

using namespace nanochat;
using nanochat_test::GlobalStateGuard;

namespace {

// Runs parallel_for(n) and checks that every index ran exactly once.
::testing::AssertionResult covers_once(int64_t n) {
  std::unique_ptr<std::atomic<int>[]> hits(new std::atomic<int>[size_t(n > 0 ? n : 1)]);
  for (int64_t i = 0; i < n; ++i) hits[size_t(i)] = 0;
  std::atomic<int64_t> calls{0}, bad{0};
  parallel_for(n, [&](int64_t i) {
    calls.fetch_add(1);
    if (i < 0 || i >= n)
      bad.fetch_add(1);
    else
      hits[size_t(i)].fetch_add(1);
  });
  if (bad) return ::testing::AssertionFailure() << bad << " out-of-range indices";
  if (calls != (n > 0 ? n : 0))
    return ::testing::AssertionFailure() << calls << " calls for n = " << n;
  for (int64_t i = 0; i < n; ++i)
    if (hits[size_t(i)] != 1)
      return ::testing::AssertionFailure() << "index " << i << " ran " << hits[size_t(i)]
                                           << " times";
  return ::testing::AssertionSuccess();
}

}  // namespace

TEST(ThreadPool, EveryIndexRunsExactlyOnce) {
  GlobalStateGuard guard;
  for (int threads : {1, 2, 4}) {
    set_num_threads(threads);
    ASSERT_EQ(num_threads(), threads);
    for (int64_t n : {0, 1, 2, 3, 1000}) {
      EXPECT_TRUE(covers_once(n)) << "threads " << threads << " n " << n;
    }
    // many small jobs back to back (workers spinning between jobs)
    for (int rep = 0; rep < 200; ++rep) ASSERT_TRUE(covers_once(rep % 7)) << rep;
    EXPECT_TRUE(covers_once(-5));  // negative n: nothing runs
  }
}

TEST(ThreadPool, DefaultThreadCount) {
  GlobalStateGuard guard;
  set_num_threads(3);
  EXPECT_EQ(num_threads(), 3);
  set_num_threads(0);
  const int def = num_threads();
  EXPECT_GE(def, 1);
  if (!std::getenv("NANOCHAT_NUM_THREADS")) {
    const unsigned hw = std::thread::hardware_concurrency();
    EXPECT_EQ(def, hw ? int(hw) : 1);
  }
  set_num_threads(-2);
  EXPECT_EQ(num_threads(), def);
}

TEST(ThreadPool, WorkIsSharedBetweenThreads) {
  GlobalStateGuard guard;
  set_num_threads(4);
  std::mutex mu;
  std::set<std::thread::id> ids;
  parallel_for(200, [&](int64_t) {
    {
      std::lock_guard<std::mutex> lk(mu);
      ids.insert(std::this_thread::get_id());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  EXPECT_GE(ids.size(), 2u) << "200 one-millisecond tasks all ran on one thread";
  EXPECT_LE(ids.size(), 4u);
  // a pool of one runs everything on the caller
  set_num_threads(1);
  ids.clear();
  parallel_for(50, [&](int64_t) {
    std::lock_guard<std::mutex> lk(mu);
    ids.insert(std::this_thread::get_id());
  });
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(*ids.begin(), std::this_thread::get_id());
}

TEST(ThreadPool, ExceptionPropagatesAndPoolStaysUsable) {
  GlobalStateGuard guard;
  for (int threads : {1, 2, 4}) {
    SCOPED_TRACE(testing::Message() << "threads " << threads);
    set_num_threads(threads);
    for (int64_t n : {1, 2, 1000}) {
      const int64_t bad = n / 2;
      std::atomic<int> ran{0};
      try {
        parallel_for(n, [&](int64_t i) {
          ran.fetch_add(1);
          if (i == bad) throw std::runtime_error("boom at " + std::to_string(i));
        });
        ADD_FAILURE() << "no exception for n " << n;
      } catch (const std::runtime_error& e) {
        EXPECT_EQ(std::string(e.what()), "boom at " + std::to_string(bad));
      }
      EXPECT_GE(ran.load(), 1);
      EXPECT_LE(ran.load(), n);
      // the pool still works, repeatedly
      for (int rep = 0; rep < 3; ++rep) ASSERT_TRUE(covers_once(1000)) << "after n " << n;
    }
    // every index throws: exactly one exception reaches the caller
    int caught = 0;
    try {
      parallel_for(100, [](int64_t i) { throw int(i); });
    } catch (int i) {
      ++caught;
      EXPECT_GE(i, 0);
      EXPECT_LT(i, 100);
    }
    EXPECT_EQ(caught, 1);
    ASSERT_TRUE(covers_once(1000));
    // and a job after the throwing one does not see its stale exception
    EXPECT_NO_THROW(parallel_for(10, [](int64_t) {}));
  }
}

TEST(ThreadPool, NestedParallelForRunsInline) {
  GlobalStateGuard guard;
  for (int threads : {1, 2, 4}) {
    SCOPED_TRACE(testing::Message() << "threads " << threads);
    set_num_threads(threads);
    const int64_t outer = 16, inner = 100;
    std::vector<std::atomic<int>> hits(size_t(outer * inner));
    for (auto& h : hits) h = 0;
    std::atomic<int> off_thread{0};
    parallel_for(outer, [&](int64_t i) {
      const auto me = std::this_thread::get_id();
      parallel_for(inner, [&](int64_t j) {
        if (std::this_thread::get_id() != me) off_thread.fetch_add(1);
        hits[size_t(i * inner + j)].fetch_add(1);
      });
    });
    EXPECT_EQ(off_thread.load(), 0) << "nested work left its calling thread";
    for (size_t k = 0; k < hits.size(); ++k) ASSERT_EQ(hits[k].load(), 1) << k;
    // the pool is usable after nesting, and an exception from a nested call propagates
    ASSERT_TRUE(covers_once(1000));
    EXPECT_THROW(parallel_for(4,
                              [](int64_t i) {
                                parallel_for(4, [i](int64_t j) {
                                  if (i == 2 && j == 3) throw std::logic_error("nested");
                                });
                              }),
                 std::logic_error);
    ASSERT_TRUE(covers_once(1000));
  }
}

TEST(ThreadPool, ConcurrentCallersAllComplete) {
  GlobalStateGuard guard;
  for (int threads : {2, 4}) {
    SCOPED_TRACE(testing::Message() << "threads " << threads);
    set_num_threads(threads);
    constexpr int kCallers = 4, kReps = 30;
    constexpr int64_t kN = 1000;
    std::atomic<int> failures{0};
    std::vector<std::thread> callers;
    for (int c = 0; c < kCallers; ++c)
      callers.emplace_back([&, c] {
        for (int rep = 0; rep < kReps; ++rep) {
          std::vector<int> hits(size_t(kN), 0);  // each index written by one thread only
          std::atomic<int64_t> sum{0};
          parallel_for(kN, [&](int64_t i) {
            hits[size_t(i)] += 1;
            sum.fetch_add(i * (c + 1));
          });
          for (int v : hits)
            if (v != 1) failures.fetch_add(1);
          if (sum != (c + 1) * kN * (kN - 1) / 2) failures.fetch_add(1);
        }
      });
    for (auto& t : callers) t.join();
    EXPECT_EQ(failures.load(), 0);
  }
}

TEST(ThreadPool, ResizingWhileOtherThreadsRun) {
  // set_num_threads swaps the pool; jobs already running on the old one finish.
  GlobalStateGuard guard;
  set_num_threads(2);
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, jobs{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 2; ++c)
    callers.emplace_back([&] {
      while (!stop) {
        std::vector<std::atomic<int>> hits(300);
        for (auto& h : hits) h = 0;
        parallel_for(300, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
        for (auto& h : hits)
          if (h != 1) failures.fetch_add(1);
        jobs.fetch_add(1);
      }
    });
  for (int k = 0; k < 20; ++k) {
    set_num_threads(1 + k % 4);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  stop = true;
  for (auto& t : callers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(jobs.load(), 0);
}

TEST(ThreadPool, JobPostedRightAfterResizeIsNotLost) {
  // A fresh pool's workers may not have started when the first job is posted;
  // that job must still be seen by every worker (the caller waits for all of
  // them), or parallel_for never returns and ctest's timeout fails this test.
  GlobalStateGuard guard;
  for (int rep = 0; rep < 100; ++rep) {
    set_num_threads(2 + rep % 3);
    ASSERT_TRUE(covers_once(64)) << rep;
  }
}

// Back-to-back small jobs: a worker that wakes late must never run a task of a finished
// job, nor one twice (the caller returns once every task completed, without waiting for
// workers to check in).
TEST(ThreadPool, ManySmallJobsRunEachTaskOnce) {
  nanochat_test::GlobalStateGuard guard;
  nanochat::set_num_threads(2);
  std::vector<std::atomic<int>> hits(5);
  for (int job = 0; job < 20000; ++job) {
    const int n = 1 + job % 5;
    for (int i = 0; i < n; ++i) hits[size_t(i)].store(0);
    nanochat::parallel_for(n, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
    for (int i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "job " << job;
  }
}

namespace {

// Runs parallel_for(n) whose tasks each wait (up to 20 s) until all n have started:
// true when they ran at the same time, i.e. on n threads.
bool runs_on_n_threads(int n) {
  std::atomic<int> arrived{0};
  std::atomic<bool> timed_out{false};
  parallel_for(n, [&](int64_t) {
    arrived.fetch_add(1);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (arrived.load() < n) {
      if (std::chrono::steady_clock::now() > until) {
        timed_out = true;
        return;
      }
      std::this_thread::yield();
    }
  });
  return !timed_out;
}

}  // namespace

// A second caller while the first one's job runs gets threads of its own: it used to find
// the one global pool busy and run inline, a whole session silently on one thread.
TEST(ThreadPool, ConcurrentCallersEachGetAllThreads) {
  GlobalStateGuard guard;
  set_num_threads(3);
  std::atomic<bool> release{false}, first_running{false};
  std::thread first([&] {
    parallel_for(3, [&](int64_t) {
      first_running = true;
      while (!release) std::this_thread::yield();
    });
  });
  while (!first_running) std::this_thread::yield();
  EXPECT_TRUE(runs_on_n_threads(3));
  release = true;
  first.join();
}

TEST(ThreadPool, ThreadCountScopeIsPerThread) {
  GlobalStateGuard guard;
  set_num_threads(2);
  {
    ThreadCountScope scope(4);
    EXPECT_TRUE(runs_on_n_threads(4));
    EXPECT_EQ(num_threads(), 2);  // the library-wide count is untouched
    int other = 0;
    std::thread([&] {
      std::set<std::thread::id> ids;
      std::mutex mu;
      parallel_for(64, [&](int64_t) {
        std::lock_guard<std::mutex> lk(mu);
        ids.insert(std::this_thread::get_id());
      });
      other = int(ids.size());
    }).join();
    EXPECT_LE(other, 2);  // another thread is not in the scope
  }
  EXPECT_TRUE(runs_on_n_threads(2));
}

TEST(ThreadPool, ThreadCountIsBounded) {
  GlobalStateGuard guard;
  set_num_threads(2);
  EXPECT_THROW(set_num_threads(kMaxThreads + 1), nanochat::Error);
  try {
    set_num_threads(1 << 30);
    ADD_FAILURE() << "no error for 2^30 threads";
  } catch (const nanochat::Error& e) {
    EXPECT_NE(std::string(e.what()).find("1024"), std::string::npos) << e.what();
  }
  EXPECT_EQ(num_threads(), 2);  // the previous count stays
  EXPECT_TRUE(covers_once(100));
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define NANOCHAT_NO_RLIMIT_TEST
#endif
#endif
#else
#define NANOCHAT_NO_RLIMIT_TEST
#endif

// Threads that cannot be created (here: address space for their stacks runs out part way)
// give an error and the previous pool, not std::terminate or a hang: the started workers
// are stopped and joined. In a child process, which the limit then cannot hurt.
TEST(ThreadPool, FailedThreadStartIsAnError) {
#ifdef NANOCHAT_NO_RLIMIT_TEST
  GTEST_SKIP() << "sanitizer runtimes need the address space this test takes away";
#else
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    alarm(60);  // a hang fails the test rather than the run
    set_num_threads(1);
    // The address space in use now plus 64 MiB: a few 8 MiB thread stacks, not 200.
    long pages = 0, resident = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) pages = 0;
      std::fclose(f);
    }
    if (pages <= 0) _exit(3);
    const rlim_t cap = rlim_t(pages) * rlim_t(sysconf(_SC_PAGESIZE)) + (64u << 20);
    const rlimit lim{cap, cap};
    if (setrlimit(RLIMIT_AS, &lim) != 0) _exit(3);
    int code = 1;
    try {
      set_num_threads(200);
    } catch (const nanochat::Error& e) {
      code = std::string(e.what()).find("could not start thread") != std::string::npos ? 0 : 2;
    }
    if (code == 0 && num_threads() != 1) code = 4;
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: no error, 2: another error, 3: setup, 4: count";
#endif
}
