// The SwiGLU block's gate/up matmul with the gating in the epilogue, h = silu(x @ Wg^T) * (x @ Wu^T), as CUTLASS 4
// (CuTe) Hopper kernels: TMA warp-specialised mainloops (a producer warp loads x and weight tiles, two consumer
// warpgroups run the wgmma instructions, either on alternate tiles, ping-pong, so one's epilogue runs while the
// other's matmul does, or together on one tile, cooperative) and an epilogue of our own.
//
// Weight layout: the caller passes W_gate_up with its rows interleaved in blocks of 64 (models/cutlass_ops.py,
// `interleave_gate_up`): rows 128·t .. 128·t+63 are gate rows 64·t .. 64·t+63 and rows 128·t+64 .. 128·t+127
// are the up rows of the same outputs. A 128-column tile of the product then holds the gate and up columns of
// 64 outputs, and the epilogue turns a M x 128 accumulator tile into a M x 64 tile of h.
//
// The epilogue rounds the fp32 accumulators to bf16 (F.linear's output rounding) and computes
// act = bf16(g · sigmoid(g)) and h = bf16(act · u) in fp32 (the roundings of F.silu and of the product in bf16);
// `Store` below lists the four ways it moves the values, and `Configs` the combinations built (each timed in
// benchmarks/RESULTS.md).
//
// Built by models/cutlass_ops.py with nvcc for sm_90a (-DNDEBUG: without it ptxas serialises the wgmma
// instructions) into a shared library with a C entry point, called through ctypes on PyTorch's stream.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/bfloat16.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace hrm {

using namespace cute;
using bf16 = cutlass::bfloat16_t;

// h of one output from its bf16-rounded gate and up values, with the PyTorch path's roundings. The sigmoid is the
// instruction sequence the Triton kernel compiles to (ex2.approx, then the approximate full-range division): no
// branches. An IEEE division (`/`) has a slow-path branch for each output, and the branches keep the compiler
// from interleaving the 64 outputs a thread computes, so their latencies add up while one warp a scheduler runs
// the epilogue.
CUTLASS_DEVICE float sigmoid(float x) {
  float e, s;
  asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(-x * 1.44269504088896341f));
  asm("div.full.f32 %0, %1, %2;" : "=f"(s) : "f"(1.0f), "f"(1.0f + e));
  return s;
}

CUTLASS_DEVICE bf16 swiglu(float gate, float up) {
  float const act = float(bf16(gate * sigmoid(gate)));
  return bf16(act * up);
}

// The gating in registers: put(r, c, pair) gets h of this tile's row r, outputs c and c + 1 (c even, < kTileN / 2),
// as two bf16 in one 32-bit word. The wgmma accumulator fragment is ((2, 2, N / 8), MMA_M, MMA_N): two adjacent
// columns, rows r and r + 8, column groups of 8. With one MMA along N the gate columns c < kTileN / 2 are groups
// j < N / 16 and the up column c + kTileN / 2 is group j + N / 16 of the same thread: no data moves between threads.
template <int kTileM, int kTileN, class FrgEngine, class FrgLayout, class ThreadMma, class Put>
CUTLASS_DEVICE void gate_in_registers(cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                      ThreadMma const& thread_mma, Put&& put) {
  using Frag = FrgLayout;
  static_assert(decltype(size<2>(Frag{}))::value == 1, "one MMA along N");
  static_assert(decltype(size<0, 0>(Frag{}))::value == 2 && decltype(size<0, 1>(Frag{}))::value == 2,
                "the wgmma accumulator layout");
  constexpr int kGroups = decltype(size<0, 2>(Frag{}))::value;
  static_assert(kGroups == kTileN / 8, "the wgmma accumulator layout");
  Tensor coords = thread_mma.partition_C(make_identity_tensor(make_shape(Int<kTileM>{}, Int<kTileN>{})));
  CUTLASS_PRAGMA_UNROLL
  for (int mm = 0; mm < size<1>(Frag{}); ++mm) {
    CUTLASS_PRAGMA_UNROLL
    for (int rh = 0; rh < 2; ++rh) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kGroups / 2; ++j) {
        alignas(4) bf16 pair[2];
        CUTLASS_PRAGMA_UNROLL
        for (int v = 0; v < 2; ++v) {
          float const gate = float(bf16(accumulators(make_coord(v, rh, j), mm, 0)));
          float const up = float(bf16(accumulators(make_coord(v, rh, j + kGroups / 2), mm, 0)));
          pair[v] = swiglu(gate, up);
        }
        auto const rc = coords(make_coord(0, rh, j), mm, 0);
        put(int(get<0>(rc)), int(get<1>(rc)), *reinterpret_cast<uint32_t const*>(pair));
      }
    }
  }
}

// How the epilogue gets from accumulators to h (the configurations below time each):
enum class Store {
  kGateUpTile,  // bf16(acc) of gate and up into shared memory, then 8 outputs a thread, 16-byte stores
  kHTile,       // the gating in registers (a thread holds the gate and the up value of its outputs), h into
                // shared memory (half the tile), then 16-byte stores
  kDirect,      // the gating in registers, 4-byte stores of two outputs straight to global memory
  kTmaStore,    // the gating in registers, h into a 128-byte-swizzled shared tile, one asynchronous TMA store
                // (SwigluTmaEpilogue below)
};

// The epilogue: an operator-style collective (the interface of CUTLASS's DefaultEpilogue), adapted to the
// warp-specialised kernels by Sm90TmaWarpSpecializedAdapter.
template <int kTileM, int kTileN, Store kStore, int kThreads>
class SwigluEpilogue {
 public:
  static_assert(kTileN % 16 == 0, "a tile holds gate and up columns of kTileN / 2 outputs, 8 at a time");
  static constexpr int kOut = kTileN / 2;     // outputs of h per tile row
  static constexpr int kWidth = kStore == Store::kGateUpTile ? kTileN : kOut;  // columns of the smem tile
  static constexpr int kPitch = kWidth + 8;   // bf16 elements a shared-memory row: 16 bytes of padding
  static constexpr int kRows = kStore == Store::kDirect ? 1 : kTileM;  // no tile for direct stores

  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementOutput = bf16;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = void;
  using ElementD = bf16;
  using StrideC = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct ThreadEpilogueOp {  // named by GemmUniversalAdapter only; the math is in operator() below
    using ElementOutput = bf16;
    using ElementAccumulator = float;
    using ElementCompute = float;
  };

  struct SharedStorage {
    alignas(128) bf16 tile[kRows * kPitch];
  };
  using TensorStorage = SharedStorage;

  struct Arguments {
    bf16* ptr_h = nullptr;
    int64_t ld_h = 0;  // row stride of h, in elements
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto n = get<1>(problem_shape);
    return n % kTileN == 0 && args.ptr_h != nullptr && args.ld_h % 8 == 0;
  }

  CUTLASS_HOST_DEVICE
  SwigluEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators, TiledMma tiled_mma,
                                 ResidueMNK, int thread_idx, char* smem) {
    static_assert(size<0>(BlockShapeMNK{}) == kTileM && size<1>(BlockShapeMNK{}) == kTileN, "tile shape");
    bf16* tile = reinterpret_cast<SharedStorage*>(smem)->tile;
    int const rows = get<0>(problem_shape_mnkl);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    int64_t const first_row = int64_t(m_coord) * kTileM;
    int64_t const first_out = int64_t(n_coord) * kOut;
    auto thread_mma = tiled_mma.get_thread_slice(thread_idx);

    if constexpr (kStore == Store::kGateUpTile) {
      // (1) bf16(acc) into the tile, each value where the MMA's thread layout puts it.
      Tensor s_tile = make_tensor(make_smem_ptr(tile),
                                  make_layout(make_shape(Int<kTileM>{}, Int<kTileN>{}),
                                              make_stride(Int<kPitch>{}, Int<1>{})));
      Tensor t_tile = thread_mma.partition_C(s_tile);
      CUTE_STATIC_ASSERT_V(size(t_tile) == size(accumulators), "one shared-memory slot per accumulator");
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accumulators); ++i) {
        t_tile(i) = bf16(accumulators(i));
      }
    } else {
      gate_in_registers<kTileM, kTileN>(accumulators, thread_mma, [&](int r, int c, uint32_t pair) {
        if constexpr (kStore == Store::kHTile) {
          *reinterpret_cast<uint32_t*>(tile + r * kPitch + c) = pair;
        } else if (first_row + r < rows) {
          *reinterpret_cast<uint32_t*>(params_.ptr_h + (first_row + r) * params_.ld_h + first_out + c) = pair;
        }
      });
    }
    if constexpr (kStore == Store::kDirect) {
      return;
    } else {
      int const barrier =
          int(cutlass::arch::ReservedNamedBarriers::FirstUserBarrier) + cutlass::canonical_warp_group_idx();
      cutlass::arch::NamedBarrier::sync(kThreads, barrier);

      // (2) 8 outputs a thread and step: row r, outputs 8·c .. 8·c+7 of this tile.
      constexpr int kChunks = kTileM * kOut / 8;
      static_assert(kChunks % kThreads == 0, "whole steps");
      CUTLASS_PRAGMA_UNROLL
      for (int step = 0; step < kChunks / kThreads; ++step) {
        int const chunk = step * kThreads + thread_idx;
        int const r = chunk / (kOut / 8);
        int const c = chunk % (kOut / 8);
        alignas(16) bf16 h[8];
        if constexpr (kStore == Store::kGateUpTile) {
          uint4 const g_bits = *reinterpret_cast<uint4 const*>(tile + r * kPitch + 8 * c);
          uint4 const u_bits = *reinterpret_cast<uint4 const*>(tile + r * kPitch + kOut + 8 * c);
          bf16 const* g = reinterpret_cast<bf16 const*>(&g_bits);
          bf16 const* u = reinterpret_cast<bf16 const*>(&u_bits);
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < 8; ++j) {
            h[j] = swiglu(float(g[j]), float(u[j]));
          }
        } else {
          *reinterpret_cast<uint4*>(h) = *reinterpret_cast<uint4 const*>(tile + r * kPitch + 8 * c);
        }
        if (first_row + r < rows) {
          *reinterpret_cast<uint4*>(params_.ptr_h + (first_row + r) * params_.ld_h + first_out + 8 * c) =
              *reinterpret_cast<uint4 const*>(h);
        }
      }
      // The ping-pong kernel's other warpgroup starts its epilogue only after every thread here has arrived at
      // the kernel's order barrier, so the shared tile is free again by then.
    }
  }

 private:
  Params params_;
};

// The epilogue with h written by TMA: the gating in registers (gate_in_registers), h into a shared tile in the
// 128-byte swizzle TMA reads (conflict-free for the accumulator layout's writes), then one warp issues an
// asynchronous bulk store of the whole tile and waits only until TMA has read it, so the warpgroup goes back to
// its matmul while the bytes drain to global memory. TMA clips the rows past the end. kThreads: the threads
// sharing a tile (128 ping-pong, 256 cooperative).
template <int kTileM, int kTileN, int kThreads>
class SwigluTmaEpilogue {
 public:
  static constexpr int kOut = kTileN / 2;  // outputs of h per tile row
  static_assert(kOut * sizeof(bf16) == 128, "a tile row of h is one 128-byte swizzle row");
  using SmemLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kTileM>, Int<kOut>>{}));
  using StrideH = cute::Stride<int64_t, cute::Int<1>>;
  using TmaH = decltype(make_tma_copy(
      SM90_TMA_STORE{},
      make_tensor(make_gmem_ptr<bf16>(nullptr), make_layout(make_shape(int32_t(0), int32_t(0)), StrideH{})),
      SmemLayout{}));

  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementOutput = bf16;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = void;
  using ElementD = bf16;
  using StrideC = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct ThreadEpilogueOp {  // named by GemmUniversalAdapter only; the math is in operator() below
    using ElementOutput = bf16;
    using ElementAccumulator = float;
    using ElementCompute = float;
  };

  struct SharedStorage {
    cute::array_aligned<bf16, cute::cosize_v<SmemLayout>, 1024> tile;
  };
  using TensorStorage = SharedStorage;

  struct Arguments {
    bf16* ptr_h = nullptr;
    int64_t ld_h = 0;  // row stride of h, in elements
  };
  struct Params {
    TmaH tma_h;  // the kernel's parameters hold the descriptor; params_ below refers to them, never copies it
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void*) {
    auto const m = int32_t(get<0>(problem_shape));
    auto const n = int32_t(get<1>(problem_shape));
    Tensor h = make_tensor(make_gmem_ptr(args.ptr_h), make_layout(make_shape(m, n / 2), StrideH{args.ld_h, {}}));
    return {make_tma_copy(SM90_TMA_STORE{}, h, SmemLayout{})};
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    // TMA: a 16-byte aligned base and row stride
    auto n = get<1>(problem_shape);
    return n % kTileN == 0 && args.ptr_h != nullptr && args.ld_h % 8 == 0 &&
           reinterpret_cast<uintptr_t>(args.ptr_h) % 16 == 0;
  }

  // SmemLayout's element offset of (r, c), written out: within each 1024-byte block of 8 rows, the 16-byte chunk
  // c / 8 of row r sits at chunk (c / 8) xor (r % 8). (Indexing s_h itself applies the swizzle to the address's
  // bits, which loses the shared address space: generic 64-bit stores and, in the ping-pong kernel, spills.)
  // tests/test_cutlass_ops.py checks it against SmemLayout on the host.
  CUTLASS_HOST_DEVICE static int swizzled(int r, int c) {
    return (r / 8) * 8 * kOut + (r % 8) * kOut + (((c / 8) ^ (r % 8)) * 8) + c % 8;
  }

  CUTLASS_HOST_DEVICE explicit SwigluTmaEpilogue(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK, BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators, TiledMma tiled_mma,
                                 ResidueMNK, int thread_idx, char* smem) {
    static_assert(size<0>(BlockShapeMNK{}) == kTileM && size<1>(BlockShapeMNK{}) == kTileN, "tile shape");
    bf16* tile = reinterpret_cast<SharedStorage*>(smem)->tile.data();
    Tensor s_h = make_tensor(make_smem_ptr(tile), SmemLayout{});
    int const barrier = int(cutlass::arch::ReservedNamedBarriers::FirstUserBarrier) +
                        (kThreads == 128 ? cutlass::canonical_warp_group_idx() : 1);
    bool const issuer = thread_idx < 32;
    if constexpr (kThreads > 128) {
      // Both warpgroups write one tile: the issuing warp's wait for the previous tile's store comes first. (A
      // ping-pong warpgroup's epilogue starts after the other's has ended, the wait included, by the kernel's
      // order barrier.)
      cutlass::arch::NamedBarrier::sync(kThreads, barrier);
    }
    gate_in_registers<kTileM, kTileN>(accumulators, tiled_mma.get_thread_slice(thread_idx),
                                      [&](int r, int c, uint32_t pair) {
                                        *reinterpret_cast<uint32_t*>(tile + swizzled(r, c)) = pair;
                                      });
    cutlass::arch::fence_view_async_shared();  // the generic-proxy writes above, visible to TMA
    cutlass::arch::NamedBarrier::sync(kThreads, barrier);
    if (issuer) {
      Tensor m_h = params_.tma_h.get_tma_tensor(
          make_shape(int32_t(get<0>(problem_shape_mnkl)), int32_t(get<1>(problem_shape_mnkl) / 2)));
      Tensor g_h = local_tile(m_h, Shape<Int<kTileM>, Int<kOut>>{},
                              make_coord(get<0>(blk_coord_mnkl), get<1>(blk_coord_mnkl)));
      auto s2g = params_.tma_h.get_slice(Int<0>{});
      copy(params_.tma_h, s2g.partition_S(s_h), s2g.partition_D(g_h));
      tma_store_arrive();
      tma_store_wait<0>();  // the tile is read (not yet written): shared memory may be reused
    }
  }

 private:
  Params const& params_;
};

using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;        // a tile a warpgroup, two in flight
using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;  // both warpgroups on one tile

// kProduct: CUTLASS's own TMA epilogue writing the bf16 product [M, N] (no gating): a timing reference for the
// mainloop, not used by the models.
template <int kTileM, int kTileN, int kTileK, int kClusterM, class Schedule, Store kStore, bool kProduct = false>
struct GateUpSwiglu {
  using TileShape = Shape<Int<kTileM>, Int<kTileN>, Int<kTileK>>;
  using ClusterShape = Shape<Int<kClusterM>, _1, _1>;
  static constexpr bool kPingpong = std::is_same_v<Schedule, Pingpong>;
  static_assert(kPingpong || kStore == Store::kDirect || kStore == Store::kTmaStore,
                "the 16-byte-store epilogues assume a tile a warpgroup");
  using ProductEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, 8,
      bf16, cutlass::layout::RowMajor, 8,
      std::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                         cutlass::epilogue::TmaWarpSpecializedCooperative>>::CollectiveOp;
  using CollectiveEpilogue = std::conditional_t<
      kProduct, ProductEpilogue,
      cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<std::conditional_t<
          kStore == Store::kTmaStore, SwigluTmaEpilogue<kTileM, kTileN, kPingpong ? 128 : 256>,
          SwigluEpilogue<kTileM, kTileN, kStore, kPingpong ? 128 : 256>>>>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      bf16, cutlass::layout::RowMajor, 8,     // x [M, K]
      bf16, cutlass::layout::ColumnMajor, 8,  // interleaved W_gate_up [N, K], K contiguous
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(void const* x, void const* w, void* h, int m, int n, int k,
                                            int sm_count) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = 0;
    hw_info.sm_count = sm_count;
    typename CollectiveEpilogue::Arguments epilogue;
    if constexpr (kProduct) {
      auto stride_d = cutlass::make_cute_packed_stride(typename CollectiveEpilogue::StrideD{}, make_shape(m, n, 1));
      epilogue = {{1.0f, 0.0f}, nullptr, stride_d, static_cast<bf16*>(h), stride_d};
    } else {
      epilogue = {static_cast<bf16*>(h), int64_t(n / 2)};
    }
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<bf16 const*>(x), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
         static_cast<bf16 const*>(w), cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1))},
        epilogue,
        hw_info};
  }

  // 0 on success; otherwise a cutlass::Status (can_implement or initialize) or a CUDA error + 1000.
  static int run(void const* x, void const* w, void* h, int m, int n, int k, int sm_count, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    Gemm gemm;
    auto args = arguments(x, w, h, m, n, k, sm_count);
    if (Gemm::get_workspace_size(args) > workspace_bytes) return int(cutlass::Status::kErrorWorkspaceNull);
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) return int(status);
    status = gemm.initialize(args, workspace, stream);
    if (status != cutlass::Status::kSuccess) return int(status);
    status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) return int(status);
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? 0 : 1000 + int(err);
  }

  static size_t workspace(int m, int n, int k, int sm_count) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, m, n, k, sm_count));
  }
};

#ifndef HRM_GATE_UP_LAYOUT_ONLY  // defined by the host-side test of SwigluTmaEpilogue::swizzled (no kernels)

// The configurations this library builds, in the order of models/cutlass_ops.py's CONFIGS; `config` in the entry
// points picks one. The last writes the product, not h.
using Configs = cute::tuple<
    GateUpSwiglu<128, 128, 64, 1, Pingpong, Store::kGateUpTile>,     // 0: 128 x 128 tiles
    GateUpSwiglu<128, 128, 64, 2, Pingpong, Store::kGateUpTile>,     // 1: two CTAs along M share weight tiles
    GateUpSwiglu<128, 128, 64, 1, Pingpong, Store::kHTile>,          // 2: gating in registers, h through smem
    GateUpSwiglu<128, 128, 64, 1, Pingpong, Store::kDirect>,         // 3: gating in registers, direct stores
    GateUpSwiglu<256, 128, 64, 1, Cooperative, Store::kDirect>,      // 4: 256 x 128 tiles, both warpgroups
    GateUpSwiglu<128, 128, 64, 1, Pingpong, Store::kTmaStore>,       // 5: gating in registers, h by TMA
    GateUpSwiglu<256, 128, 64, 1, Cooperative, Store::kTmaStore>,    // 6: the same, 256 x 128 tiles
    GateUpSwiglu<128, 128, 64, 1, Pingpong, Store::kDirect, true>>;  // 7: the product alone (timing reference)
constexpr int kConfigs = cute::tuple_size<Configs>::value;

template <int I = 0, class F>
auto dispatch(int config, F&& f) {
  if constexpr (I + 1 < kConfigs) {
    if (config != I) return dispatch<I + 1>(config, f);
  }
  return f(cute::tuple_element_t<I, Configs>{});
}

#endif  // HRM_GATE_UP_LAYOUT_ONLY

}  // namespace hrm

#ifndef HRM_GATE_UP_LAYOUT_ONLY

extern "C" {

// Bytes of workspace `hrm_gate_up_swiglu` needs (x: [m, k], interleaved w: [n, k], h: [m, n / 2]).
size_t hrm_gate_up_swiglu_workspace(int config, int m, int n, int k, int sm_count) {
  return hrm::dispatch(config, [&](auto c) { return decltype(c)::workspace(m, n, k, sm_count); });
}

int hrm_gate_up_swiglu(int config, void const* x, void const* w, void* h, int m, int n, int k, int sm_count,
                       void* workspace, size_t workspace_bytes, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (config < 0 || config >= hrm::kConfigs) return -1;
  return hrm::dispatch(config, [&](auto c) {
    return decltype(c)::run(x, w, h, m, n, k, sm_count, workspace, workspace_bytes, s);
  });
}

int hrm_gate_up_swiglu_configs() { return hrm::kConfigs; }

}  // extern "C"

#endif  // HRM_GATE_UP_LAYOUT_ONLY
