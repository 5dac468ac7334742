// The scheduler behind cuda_runtime.h: blocks one after another, a block's threads as fibers.
//
// Fibers switch stacks with lag_emu_switch below: six callee-saved registers and the stack pointer,
// no system call and nothing a sanitizer intercepts (setjmp/longjmp and ucontext cost a signal-mask
// call or, under AddressSanitizer, a shadow clear and a sigaltstack call on every switch). Only one
// grid runs at a time (a mutex): the emulated GPU is one in-order stream.
#include <stdlib.h>
#include <sys/mman.h>

#include <algorithm>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"

// Under AddressSanitizer (LAG_EMU_ASAN=1) every stack switch is announced, so that ASan tracks
// which stack is live (otherwise it warns that false reports may follow).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define LAG_EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define LAG_EMU_FINISH_SWITCH(save, bottom_old, size_old) __sanitizer_finish_switch_fiber(save, bottom_old, size_old)
#else
#define LAG_EMU_START_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define LAG_EMU_FINISH_SWITCH(save, bottom_old, size_old) ((void)(save), (void)(bottom_old), (void)(size_old))
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's stack switch is written for x86-64"
#endif

// lag_emu_switch(save, to): saves the callee-saved registers on the current stack, stores its
// stack pointer in *save, and continues on stack `to` (one saved by an earlier switch, or one
// prepared by new_fiber_stack). Returns when something switches back to *save.
extern "C" void lag_emu_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .globl lag_emu_switch
    .hidden lag_emu_switch
    .type lag_emu_switch, @function
lag_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lag_emu_switch, .-lag_emu_switch
)");

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// The __shared__ variables' section, bounded by the linker's __start_/__stop_ symbols.
extern "C" __attribute__((weak)) char __start_lag_emu_shared[];
extern "C" __attribute__((weak)) char __stop_lag_emu_shared[];

namespace {

constexpr size_t kStackBytes = 64 * 1024;  // ample for the kernels; ASan clears its shadow on every switch
constexpr unsigned kMaxThreads = 1024;

enum Wait { kRunnable, kAtBarrier, kAtCollective, kExited };

struct Fiber {
  void* sp = nullptr;  // where lag_emu_switch resumes it
  char* stack = nullptr;
  unsigned tid = 0;
  Wait wait = kRunnable;
  lag_emu::WarpOp op = lag_emu::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int param = 0;
  void* asan_fake_stack = nullptr;
};

struct State {
  std::mutex launch;
  std::vector<Fiber> fibers;
  std::vector<unsigned> runnable;  // a stack; pushes are shuffled
  std::vector<int> at_collective;  // per warp
  void* scheduler_sp = nullptr;
  bool faulted = false;  // the fiber that switched back last was abandoned by fault()
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;  // told by ASan when a fiber first starts
  size_t scheduler_stack_size = 0;
  Fiber* current = nullptr;
  unsigned threads = 0, live = 0, at_barrier = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const char* kernel = "";
  std::mt19937_64 rng{0};
  cudaError_t last_error = cudaSuccess, sticky = cudaSuccess;
  std::string message;
  int sms = 132;
} S;

std::string block_name() {
  return std::string(S.kernel) + " block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ")";
}

void record(cudaError_t err, const std::string& what) {
  if (S.message.empty()) S.message = what;
  if (S.last_error == cudaSuccess) S.last_error = err;
  if (err != cudaErrorInvalidValue && err != cudaErrorInvalidConfiguration) S.sticky = err;  // a fault poisons the context
}

void make_runnable(std::vector<unsigned>& ids) {
  std::shuffle(ids.begin(), ids.end(), S.rng);
  for (unsigned id : ids) {
    S.fibers[id].wait = kRunnable;
    S.runnable.push_back(id);
  }
}

// The running fiber gives the CPU back to the scheduler; a dying one (exited, or faulted) is never
// resumed.
void to_scheduler(bool dying) {
  Fiber& f = *S.current;
  LAG_EMU_START_SWITCH(dying ? nullptr : &f.asan_fake_stack, S.scheduler_stack_bottom, S.scheduler_stack_size);
  lag_emu_switch(&f.sp, S.scheduler_sp);
  LAG_EMU_FINISH_SWITCH(f.asan_fake_stack, nullptr, nullptr);
}

void suspend() { to_scheduler(false); }

// Once every live thread waits at the barrier, the others become runnable; the calling thread (the
// last to arrive, or one exiting) goes on running.
void release_barrier_if_complete() {
  if (S.at_barrier == 0 || S.at_barrier != S.live) return;
  std::vector<unsigned> ids;
  for (unsigned i = 0; i < S.threads; ++i)
    if (S.fibers[i].wait == kAtBarrier && &S.fibers[i] != S.current) ids.push_back(i);
  if (S.current->wait == kAtBarrier) S.current->wait = kRunnable;
  S.at_barrier = 0;
  make_runnable(ids);
}

void set_thread_index(unsigned tid) {
  threadIdx.x = tid % blockDim.x;
  threadIdx.y = (tid / blockDim.x) % blockDim.y;
  threadIdx.z = tid / (blockDim.x * blockDim.y);
}

void fiber_main() {
  LAG_EMU_FINISH_SWITCH(nullptr, &S.scheduler_stack_bottom, &S.scheduler_stack_size);
  S.body(S.ctx);
  S.current->wait = kExited;
  --S.live;
  release_barrier_if_complete();  // exited threads no longer count at a barrier
  to_scheduler(true);
  abort();  // never resumed
}

// A fresh stack for `f` whose first switch enters fiber_main: six zero registers for
// lag_emu_switch to pop, then fiber_main as its return address, leaving the stack pointer 8 bytes
// below a 16-byte boundary, as at any function entry.
void new_fiber_stack(Fiber& f) {
  void** top = reinterpret_cast<void**>(f.stack + kStackBytes);
  *--top = nullptr;
  *--top = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--top = nullptr;
  f.sp = top;
}

// Completes warp w's collective once all its lanes wait at one (the caller is one of them).
void complete_collective(unsigned w) {
  Fiber* lane = &S.fibers[w * 32];
  const lag_emu::WarpOp op = lane[0].op;
  for (int l = 0; l < 32; ++l) {
    if (lane[l].op != op)
      lag_emu::fault(cudaErrorLaunchFailure, "lanes of one warp reached different warp collectives");
    if (lane[l].mask != 0xffffffffu)
      lag_emu::fault(cudaErrorLaunchFailure, "only full-warp (0xffffffff) collectives are emulated");
  }
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) ballot |= (lane[l].value & 1u) << l;
  for (int l = 0; l < 32; ++l) {
    Fiber& f = lane[l];
    switch (op) {
      case lag_emu::kShflIdx: f.result = lane[f.param & 31].value; break;
      case lag_emu::kShflUp: f.result = l >= f.param ? lane[l - f.param].value : f.value; break;
      case lag_emu::kShflXor: f.result = (l ^ f.param) < 32 ? lane[l ^ f.param].value : f.value; break;
      case lag_emu::kBallot: f.result = ballot; break;
      case lag_emu::kSyncWarp: f.result = 0; break;
    }
  }
  std::vector<unsigned> ids;
  for (int l = 0; l < 32; ++l)
    if (&lane[l] != S.current) ids.push_back(w * 32 + l);
  S.at_collective[w] = 0;
  make_runnable(ids);
  S.current->wait = kRunnable;
}

std::string deadlock_report() {
  unsigned barrier = 0, collective = 0, exited = 0;
  for (unsigned i = 0; i < S.threads; ++i) {
    barrier += S.fibers[i].wait == kAtBarrier;
    collective += S.fibers[i].wait == kAtCollective;
    exited += S.fibers[i].wait == kExited;
  }
  return "deadlock in " + block_name() + ": " + std::to_string(barrier) + " threads wait at __syncthreads, " +
         std::to_string(collective) + " at warp collectives, " + std::to_string(exited) + " exited";
}

// Runs one block to completion; false if it faulted or deadlocked (the message is recorded).
bool run_block() {
  S.live = S.threads;
  S.at_barrier = 0;
  std::fill(S.at_collective.begin(), S.at_collective.end(), 0);
  std::fill(__start_lag_emu_shared, __stop_lag_emu_shared, static_cast<char>(0xff));
  std::vector<unsigned> all(S.threads);
  for (unsigned i = 0; i < S.threads; ++i) {
    Fiber& f = S.fibers[i];
    f.tid = i;
    f.wait = kRunnable;
    new_fiber_stack(f);
    all[i] = i;
  }
  S.runnable.clear();
  make_runnable(all);
  while (!S.runnable.empty()) {
    const unsigned id = S.runnable.back();
    S.runnable.pop_back();
    Fiber& f = S.fibers[id];
    S.current = &f;
    set_thread_index(f.tid);
    LAG_EMU_START_SWITCH(&S.scheduler_fake_stack, f.stack, kStackBytes);
    lag_emu_switch(&S.scheduler_sp, f.sp);
    LAG_EMU_FINISH_SWITCH(S.scheduler_fake_stack, nullptr, nullptr);
    if (S.faulted) {  // fault(): recorded; the block's fibers are abandoned
      S.faulted = false;
      return false;
    }
  }
  if (S.live != 0) {
    record(cudaErrorLaunchFailure, deadlock_report());
    return false;
  }
  return true;
}

}  // namespace

namespace lag_emu {

void block_barrier() {
  S.current->wait = kAtBarrier;
  ++S.at_barrier;
  release_barrier_if_complete();
  if (S.current->wait == kAtBarrier) suspend();
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param) {
  Fiber& f = *S.current;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  f.wait = kAtCollective;
  const unsigned w = f.tid / 32;
  if (++S.at_collective[w] == 32) complete_collective(w);
  else suspend();
  return f.result;
}

void fault(cudaError_t err, const char* what) {
  record(err, std::string(what) + " in " + block_name() + ", thread " + std::to_string(S.current->tid));
  S.faulted = true;
  to_scheduler(true);
  abort();  // never resumed
}

void run_grid(dim3 grid, dim3 block, const char* kernel, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(S.launch);
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > kMaxThreads || block.z > 64 || threads % 32 != 0) {
    record(cudaErrorInvalidConfiguration,
           std::string("invalid launch configuration of ") + kernel + ": grid (" + std::to_string(grid.x) + ", " +
               std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block of " + std::to_string(threads) +
               " threads (the emulator also needs whole warps)");
    return;
  }
  if (S.sticky != cudaSuccess) return;  // a faulted context fails every later launch
  if (S.fibers.size() < threads) {
    S.fibers.resize(kMaxThreads);
    for (Fiber& f : S.fibers) {
      if (f.stack != nullptr) continue;
      void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (mem == MAP_FAILED) abort();
      f.stack = static_cast<char*>(mem);
    }
    S.at_collective.assign(kMaxThreads / 32, 0);
  }
  S.threads = static_cast<unsigned>(threads);
  S.body = body;
  S.ctx = ctx;
  S.kernel = kernel;
  blockDim = block;
  gridDim = grid;
  std::vector<uint3> order;
  order.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(uint3{x, y, z});
  std::shuffle(order.begin(), order.end(), S.rng);
  for (const uint3& b : order) {
    blockIdx = b;
    if (!run_block()) return;
  }
}

}  // namespace lag_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = S.last_error;
  S.last_error = S.sticky;  // a fault stays reported, as on a real context
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidValue;
  *value = S.sms;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  memset(ptr, value, bytes);
  return cudaSuccess;
}

// For the Python driver (tests/emulated_cuda.py).
extern "C" void lag_emu_configure(unsigned long long seed, int sms) {
  S.rng.seed(seed);
  S.sms = sms;
}
extern "C" const char* lag_emu_message() { return S.message.c_str(); }
extern "C" void lag_emu_reset() {  // a fresh context: clears faults and the message
  S.last_error = S.sticky = cudaSuccess;
  S.message.clear();
}
