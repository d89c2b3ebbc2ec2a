// vkemu runtime: fibers for CUDA threads, block barriers, warp collectives, cp.async queues, the
// PTX instructions the kernels use, and the few CUDA runtime calls their launchers make.
// See vkemu.h for the model.
#include "vkemu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// Fiber switch. On x86-64 a six-register save (the SysV callee-saved set) and a stack swap: the
// emulator switches at every warp collective, and glibc's swapcontext (a signal-mask syscall per
// switch) made that the dominant cost. Elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void vkemu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl vkemu_switch
  .hidden vkemu_switch
  .type vkemu_switch, @function
vkemu_switch:
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
  .size vkemu_switch, .-vkemu_switch
)");
#define VKEMU_ASM_SWITCH 1
#else
#define VKEMU_ASM_SWITCH 0
#endif

namespace vkemu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kCanaryBytes = 256;           // checked after each block: writes past the dynamic smem
constexpr int kDefaultSmemOptin = 227 * 1024;  // H100 / H200: 227 KiB of opt-in shared memory
constexpr int kDefaultSmCount = 132;

enum class State { kRunnable, kBlockBarrier, kWarpOp, kDone };
enum class Op { kSyncwarp, kShfl, kLdmatrix, kMma };

const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncwarp:
      return "__syncwarp";
    case Op::kShfl:
      return "__shfl_xor_sync";
    case Op::kLdmatrix:
      return "ldmatrix";
    case Op::kMma:
      return "mma.sync";
  }
  return "?";
}

struct CpOp {
  void* dst;
  const void* src;
  int bytes;
};

struct LaneIn {
  Op op;
  uint32_t u[6];
  float f[4];
  const void* p;
  int imm;
  bool trans;
  MmaType type;
};

struct LaneOut {
  uint32_t u[4];
  float f[4];
};

// A saved execution context: a stack pointer (asm switch) or a ucontext.
struct Context {
#if VKEMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

void switch_to(Context& save, Context& next) {
#if VKEMU_ASM_SWITCH
  vkemu_switch(&save.sp, next.sp);
#else
  swapcontext(&save.uc, &next.uc);
#endif
}

void fiber_main();

// Prepares `c` to start fiber_main on the given stack at the next switch_to(..., c).
void make_context(Context& c, void* stack, size_t bytes) {
#if VKEMU_ASM_SWITCH
  // vkemu_switch pops six registers and returns: lay out zeros, then fiber_main as the return
  // address, then a fake return address for fiber_main, so that it starts with rsp % 16 == 8
  // as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~static_cast<uintptr_t>(15);
  void** sp = reinterpret_cast<void**>(top) - 8;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fiber_main);
  sp[7] = nullptr;
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_main, 0);
#endif
}

struct Fiber {
  Context ctx;
  void* stack = nullptr;
  ThreadPos pos;
  int warp = 0, lane = 0;
  State state = State::kRunnable;
  std::vector<std::vector<CpOp>> groups;  // committed cp.async groups, oldest first
  std::vector<CpOp> open;                 // issued, not yet committed
};

struct Warp {
  int size = 0;     // lanes that exist (< 32 only for a partial last warp)
  int live = 0;     // lanes not yet exited
  int arrived = 0;  // lanes waiting at the current collective
  int first = -1;   // first lane that arrived (its op is the warp's current op)
  LaneIn in[32];
  LaneOut out[32];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0;
  int at_barrier = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Context sched;
  KernelBody* body = nullptr;
  bool failed = false;
};

thread_local Block* g_block = nullptr;
thread_local Fiber* g_fiber = nullptr;
std::mutex g_stack_mu;
std::vector<void*> g_stacks;  // fiber stacks, reused by every launch and worker thread
thread_local std::vector<unsigned char> g_smem;

std::mutex g_mu;
cudaError_t g_last_error = cudaSuccess;
std::string g_message;  // detail of the last launch failure
std::map<const void*, int> g_max_dynamic_smem;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::atoi(v) : fallback;
}

void set_error(cudaError_t err, const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_last_error == cudaSuccess) {
    g_last_error = err;
    g_message = msg;
  }
}

void* new_stack() {
  std::lock_guard<std::mutex> lock(g_stack_mu);
  if (!g_stacks.empty()) {
    void* s = g_stacks.back();
    g_stacks.pop_back();
    return s;
  }
  // One guard page below the stack: an overflow faults instead of corrupting a neighbour.
  const size_t page = 4096;
  void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "vkemu: mmap of a fiber stack failed\n");
    std::abort();
  }
  mprotect(m, page, PROT_NONE);
  return static_cast<char*>(m) + page;
}

void yield() { switch_to(g_fiber->ctx, g_block->sched); }

std::string where() {
  char buf[160];
  const ThreadPos& p = g_fiber->pos;
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]: ", p.block_idx.x, p.block_idx.y,
                p.block_idx.z, p.thread_idx.x, p.thread_idx.y, p.thread_idx.z, g_fiber->warp, g_fiber->lane);
  return buf;
}

bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= g_block->smem && c + bytes <= g_block->smem + g_block->smem_bytes;
}

void release_barrier(Block& b) {
  for (Fiber& f : b.fibers) {
    if (f.state == State::kBlockBarrier) f.state = State::kRunnable;
  }
  b.at_barrier = 0;
}

float b16_to_float(uint16_t bits, MmaType type) {
  if (type == MmaType::kBF16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

uint16_t lo16(uint32_t u) { return static_cast<uint16_t>(u & 0xffffu); }
uint16_t hi16(uint32_t u) { return static_cast<uint16_t>(u >> 16); }

// Computes every lane's result of the warp's current collective from all lanes' inputs.
void resolve(Warp& w) {
  const Op op = w.in[w.first].op;
  switch (op) {
    case Op::kSyncwarp:
      break;
    case Op::kShfl:
      for (int l = 0; l < 32; ++l) {
        const int src = l ^ w.in[l].imm;
        w.out[l].u[0] = (src < 32) ? w.in[src].u[0] : w.in[l].u[0];
      }
      break;
    case Op::kLdmatrix: {
      // .x4: lanes 8m..8m+7 give the row addresses of matrix m (8 rows of 8 b16 each).
      // Lane l receives, per matrix m, row l/4, columns 2(l%4), 2(l%4)+1 (.trans: that element
      // pair of the transposed matrix, i.e. rows 2(l%4), 2(l%4)+1 of column l/4).
      for (int l = 0; l < 32; ++l) {
        for (int m = 0; m < 4; ++m) {
          uint16_t e[2];
          for (int k = 0; k < 2; ++k) {
            const int row = w.in[l].trans ? 2 * (l % 4) + k : l / 4;
            const int col = w.in[l].trans ? l / 4 : 2 * (l % 4) + k;
            const uint16_t* rp = static_cast<const uint16_t*>(w.in[8 * m + row].p);
            e[k] = rp[col];
          }
          w.out[l].u[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
        }
      }
      break;
    }
    case Op::kMma: {
      // m16n8k16, A row-major 16x16, B column-major 16x8, C/D 16x8 f32. Lane l = 4g + t holds
      // A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
      // B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g);
      // C: c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1). Low half = lower index.
      float A[16][16], B[16][8], C[16][8];
      const MmaType type = w.in[w.first].type;
      for (int l = 0; l < 32; ++l) {
        if (w.in[l].type != type) fail("mma.sync: lanes disagree on the input type");
        const int g = l >> 2, t = l & 3;
        const uint32_t* a = w.in[l].u;
        const int ar[4] = {g, g + 8, g, g + 8};
        const int ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int r = 0; r < 4; ++r) {
          A[ar[r]][ac[r]] = b16_to_float(lo16(a[r]), type);
          A[ar[r]][ac[r] + 1] = b16_to_float(hi16(a[r]), type);
        }
        B[2 * t][g] = b16_to_float(lo16(a[4]), type);
        B[2 * t + 1][g] = b16_to_float(hi16(a[4]), type);
        B[2 * t + 8][g] = b16_to_float(lo16(a[5]), type);
        B[2 * t + 9][g] = b16_to_float(hi16(a[5]), type);
        C[g][2 * t] = w.in[l].f[0];
        C[g][2 * t + 1] = w.in[l].f[1];
        C[g + 8][2 * t] = w.in[l].f[2];
        C[g + 8][2 * t + 1] = w.in[l].f[3];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const int rows[4] = {g, g, g + 8, g + 8};
        const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
        for (int e = 0; e < 4; ++e) {
          double acc = C[rows[e]][cols[e]];
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[rows[e]][k]) * B[k][cols[e]];
          w.out[l].f[e] = static_cast<float>(acc);
        }
      }
      break;
    }
  }
}

// Deposits this lane's input, waits for the whole warp, and returns this lane's result.
const LaneOut& warp_collective(const LaneIn& in, unsigned mask) {
  Block& b = *g_block;
  Fiber& f = *g_fiber;
  Warp& w = b.warps[f.warp];
  if (mask != 0xffffffffu) fail("%s: only full-warp masks are emulated (mask 0x%08x)", op_name(in.op), mask);
  if (w.size != 32) fail("%s with a full mask in a partial warp of %d lanes", op_name(in.op), w.size);
  if (w.arrived > 0 && w.in[w.first].op != in.op) {
    fail("divergent warp: lane %d reached %s while lane %d waits at %s", f.lane, op_name(in.op), w.first,
         op_name(w.in[w.first].op));
  }
  if (w.arrived == 0) w.first = f.lane;
  w.in[f.lane] = in;
  ++w.arrived;
  if (w.arrived == w.live) {
    if (w.live != 32) fail("%s: %d lanes of the warp have exited", op_name(in.op), 32 - w.live);
    resolve(w);
    for (int l = 0; l < 32; ++l) {
      Fiber& o = b.fibers[f.warp * 32 + l];
      if (o.state == State::kWarpOp) o.state = State::kRunnable;
    }
    w.arrived = 0;
    w.first = -1;
  } else {
    f.state = State::kWarpOp;
    yield();
  }
  return w.out[f.lane];
}

void land(const CpOp& c) {
  if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
}

void thread_exit() {
  Block& b = *g_block;
  Fiber& f = *g_fiber;
  size_t pending = f.open.size();
  for (const auto& g : f.groups) pending += g.size();
  if (pending > 0) fail("thread exited with %zu cp.async copies it never waited for", pending);
  Warp& w = b.warps[f.warp];
  if (w.arrived > 0) {
    fail("lane exited while %d lanes of its warp wait at %s", w.arrived, op_name(w.in[w.first].op));
  }
  f.state = State::kDone;
  --w.live;
  --b.live;
  if (b.at_barrier > 0 && b.at_barrier == b.live) release_barrier(b);
}

void fiber_main() {
  g_block->body->run();
  thread_exit();
  yield();  // never resumed
}

std::string describe_deadlock(const Block& b) {
  std::string s = "deadlock:";
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone || shown >= 6) continue;
    char buf[120];
    const char* what = f.state == State::kBlockBarrier ? "__syncthreads" : op_name(b.warps[f.warp].in[f.lane].op);
    std::snprintf(buf, sizeof buf, " thread %u waits at %s;", f.pos.thread_idx.x, what);
    s += buf;
    ++shown;
  }
  return s;
}

// Runs one block to completion (or to its first fault). Returns false on a fault.
bool run_block(Block& b, dim3 grid, dim3 block, dim3 bidx, bool reverse) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  b.fibers.resize(static_cast<size_t>(n));
  b.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[static_cast<size_t>(i)];
    f.pos.thread_idx = dim3(static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                            static_cast<unsigned>(i) / (block.x * block.y));
    f.pos.block_idx = bidx;
    f.pos.block_dim = block;
    f.pos.grid_dim = grid;
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::kRunnable;
    f.groups.clear();
    f.open.clear();
    if (f.stack == nullptr) f.stack = new_stack();
    make_context(f.ctx, f.stack, kStackBytes);
    Warp& w = b.warps[static_cast<size_t>(f.warp)];
    ++w.size;
    ++w.live;
  }
  b.live = n;
  b.at_barrier = 0;
  b.failed = false;
  std::memset(b.smem, 0xff, b.smem_bytes + kCanaryBytes);  // NaN in every float type
  while (b.live > 0) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = b.fibers[static_cast<size_t>(reverse ? n - 1 - k : k)];
      if (f.state != State::kRunnable) continue;
      g_fiber = &f;
      switch_to(b.sched, f.ctx);
      g_fiber = nullptr;
      ran = true;
      if (b.failed) return false;
    }
    if (!ran && b.live > 0) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "block (%u,%u,%u): ", bidx.x, bidx.y, bidx.z);
      set_error(cudaErrorLaunchFailure, std::string("vkemu: ") + buf + describe_deadlock(b));
      return false;
    }
  }
  for (size_t i = 0; i < kCanaryBytes; ++i) {
    if (b.smem[b.smem_bytes + i] != 0xff) {
      char buf[128];
      std::snprintf(buf, sizeof buf,
                    "vkemu: block (%u,%u,%u) wrote past the end of its %zu bytes of dynamic shared memory", bidx.x,
                    bidx.y, bidx.z, b.smem_bytes);
      set_error(cudaErrorLaunchFailure, buf);
      return false;
    }
  }
  return true;
}

}  // namespace

void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (g_fiber == nullptr || g_block == nullptr) {
    std::fprintf(stderr, "vkemu: %s (outside a kernel)\n", buf);
    std::abort();
  }
  set_error(cudaErrorLaunchFailure, "vkemu: " + where() + buf);
  g_block->failed = true;
  for (;;) yield();  // the scheduler abandons this block; the fiber is never resumed
}

const ThreadPos& pos() {
  if (g_fiber == nullptr) {
    std::fprintf(stderr, "vkemu: threadIdx/blockIdx used outside a kernel\n");
    std::abort();
  }
  return g_fiber->pos;
}

unsigned char* dynamic_smem() { return g_block->smem; }

void syncthreads() {
  Block& b = *g_block;
  Fiber& f = *g_fiber;
  if (b.warps[f.warp].arrived > 0) {
    fail("__syncthreads reached while lanes of this warp wait at %s",
         op_name(b.warps[f.warp].in[b.warps[f.warp].first].op));
  }
  ++b.at_barrier;
  if (b.at_barrier == b.live) {
    release_barrier(b);
    return;
  }
  f.state = State::kBlockBarrier;
  yield();
}

void syncwarp(unsigned mask) {
  LaneIn in{};
  in.op = Op::kSyncwarp;
  warp_collective(in, mask);
}

uint32_t shfl_xor(unsigned mask, uint32_t value, int lane_mask, int width) {
  if (width != 32) fail("__shfl_xor_sync: only width 32 is emulated");
  LaneIn in{};
  in.op = Op::kShfl;
  in.u[0] = value;
  in.imm = lane_mask;
  return warp_collective(in, mask).u[0];
}

void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size %d outside [0, 16]", src_bytes);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp.async: shared address %p not 16-byte aligned", dst);
  if (!in_smem(dst, 16)) {
    fail("cp.async: destination %p outside the block's %zu bytes of dynamic shared memory", dst, g_block->smem_bytes);
  }
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("cp.async: global address %p not 16-byte aligned", src);
  }
  g_fiber->open.push_back(CpOp{dst, src, src_bytes});
}

void cp_async_commit() {
  g_fiber->groups.push_back(std::move(g_fiber->open));
  g_fiber->open.clear();
}

void cp_async_wait(int pending) {
  auto& groups = g_fiber->groups;
  while (static_cast<int>(groups.size()) > pending) {
    for (const CpOp& c : groups.front()) land(c);
    groups.erase(groups.begin());
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0) fail("ldmatrix: row address %p not 16-byte aligned", row_addr);
  if (!in_smem(row_addr, 16)) {
    fail("ldmatrix: row address %p outside the block's %zu bytes of dynamic shared memory", row_addr,
         g_block->smem_bytes);
  }
  LaneIn in{};
  in.op = Op::kLdmatrix;
  in.p = row_addr;
  in.trans = trans;
  const LaneOut& out = warp_collective(in, 0xffffffffu);
  for (int i = 0; i < 4; ++i) r[i] = out.u[i];
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type) {
  LaneIn in{};
  in.op = Op::kMma;
  for (int i = 0; i < 4; ++i) {
    in.u[i] = a[i];
    in.f[i] = d[i];
  }
  in.u[4] = b0;
  in.u[5] = b1;
  in.type = type;
  const LaneOut& out = warp_collective(in, 0xffffffffu);
  for (int i = 0; i < 4; ++i) d[i] = out.f[i];
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, KernelBody& body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "vkemu: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", grid.x,
                  grid.y, grid.z, block.x, block.y, block.z);
    set_error(cudaErrorInvalidConfiguration, buf);
    return;
  }
  int allowed = 48 * 1024;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_max_dynamic_smem.find(kernel);
    if (it != g_max_dynamic_smem.end()) allowed = std::max(allowed, it->second);
  }
  if (smem_bytes > static_cast<size_t>(allowed)) {
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "vkemu: %zu bytes of dynamic shared memory requested, the kernel allows %d "
                  "(cudaFuncAttributeMaxDynamicSharedMemorySize)",
                  smem_bytes, allowed);
    set_error(cudaErrorInvalidValue, buf);
    return;
  }
  const char* sched = std::getenv("VKEMU_SCHEDULE");
  const bool reverse = sched != nullptr && std::strcmp(sched, "reverse") == 0;

  // Blocks are independent: worker threads take them in order from a shared counter, each with
  // its own fibers and shared memory (static __shared__ arrays are thread_local).
  const uint64_t n_blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t n_workers =
      std::min<uint64_t>(n_blocks, static_cast<uint64_t>(env_int("VKEMU_THREADS", static_cast<int>(hw))));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  auto worker = [&]() {
    Block b;
    b.body = &body;
    b.smem_bytes = smem_bytes;
    g_smem.assign(smem_bytes + kCanaryBytes + 16, 0);
    b.smem = g_smem.data() + (16 - reinterpret_cast<uintptr_t>(g_smem.data()) % 16) % 16;
    g_block = &b;
    for (uint64_t i = next++; i < n_blocks && !stop.load(); i = next++) {
      const dim3 bidx(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                      static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y)));
      if (!run_block(b, grid, block, bidx, reverse)) stop = true;
    }
    g_block = nullptr;
    std::lock_guard<std::mutex> lock(g_stack_mu);
    for (Fiber& f : b.fibers) g_stacks.push_back(f.stack);
  };
  if (n_workers <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  for (uint64_t t = 0; t < n_workers; ++t) pool.emplace_back(worker);
  for (std::thread& t : pool) t.join();
}

}  // namespace vkemu

// ---- the CUDA runtime calls the kernels' launchers and the torch glue make ----
extern "C" {

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(vkemu::g_mu);
  const cudaError_t e = vkemu::g_last_error;
  vkemu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(vkemu::g_mu);
  return vkemu::g_last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchFailure: {
      // The message of the last failed launch (thread-local copy so the pointer stays valid).
      static thread_local std::string msg;
      std::lock_guard<std::mutex> lock(vkemu::g_mu);
      msg = vkemu::g_message.empty() ? std::string("vkemu: error ") + std::to_string(static_cast<int>(error))
                                     : vkemu::g_message;
      return msg.c_str();
    }
    default:
      return "vkemu: unemulated CUDA error";
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > vkemu::env_int("VKEMU_SMEM_OPTIN", vkemu::kDefaultSmemOptin)) {
    vkemu::set_error(cudaErrorInvalidValue, "vkemu: cudaFuncSetAttribute: " + std::to_string(value) +
                                                " bytes exceed the device's opt-in shared memory");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(vkemu::g_mu);
  vkemu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = vkemu::env_int("VKEMU_SM_COUNT", vkemu::kDefaultSmCount);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = vkemu::env_int("VKEMU_SMEM_OPTIN", vkemu::kDefaultSmemOptin);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = 48 * 1024;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

}  // extern "C"
