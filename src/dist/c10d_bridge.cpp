// c10d bridge: torch.distributed's C++ engine (TCPStore rendezvous, ProcessGroupGloo,
// ProcessGroupNCCL with -DUSE_C10D_NCCL) behind a small C ABI for src/dist/mod.rs.
//
// Matches what `torch.distributed.init_process_group("gloo"|"nccl", init_method="env://")`
// builds (torch/distributed/rendezvous.py `_create_c10d_store`): a TCPStore on
// MASTER_ADDR:MASTER_PORT hosted by rank 0 (or by torchrun's agent, then every rank is a
// client), a PrefixStore, and one process group over it. Compiled by build.rs with the flags
// torch-sys compiles libtch with, against the same libtorch: tensors cross as the `at::Tensor*`
// a tch `Tensor` holds. Every C++ exception is caught here and returned as a malloc'd message
// (freed by lc_dist_free_error); nothing throws across the C boundary.
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

char* dup_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
  }
  return out;
}

// Runs `f`; on a C++ exception stores its message in *err and returns 1.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown C++ exception in the c10d bridge");
  }
  return 1;
}

// The tensors as one contiguous buffer (one collective for the whole list, like a DDP bucket).
at::Tensor flatten(const std::vector<at::Tensor>& ts) {
  TORCH_CHECK(!ts.empty(), "no tensors to communicate");
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) {
    TORCH_CHECK(t.defined(), "undefined tensor passed to a collective");
    TORCH_CHECK(t.scalar_type() == ts[0].scalar_type() && t.device() == ts[0].device(),
                "all tensors of one collective must share dtype and device");
    flat.push_back(t.detach().reshape({-1}));
  }
  return at::cat(flat, 0);
}

// Copies the buffer back into the tensors it was built from (in place, outside autograd).
void unflatten(const at::Tensor& buf, std::vector<at::Tensor>& ts) {
  c10::NoGradGuard no_grad;
  int64_t offset = 0;
  for (auto& t : ts) {
    const int64_t n = t.numel();
    t.copy_(buf.narrow(0, offset, n).view(t.sizes()));
    offset += n;
  }
}

std::vector<at::Tensor> gather(at::Tensor** tensors, size_t n) {
  std::vector<at::Tensor> ts;
  ts.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i] != nullptr, "null tensor passed to a collective");
    ts.push_back(*tensors[i]);
  }
  return ts;
}

// The network interface Gloo's pairs bind to, as torch.distributed chooses it:
// GLOO_SOCKET_IFNAME when set (its first entry), the loopback device when the master is this
// machine's loopback address (one-machine jobs), else this host's default interface.
std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& master) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname) {
    std::string first(ifname);
    first = first.substr(0, first.find(','));
    return c10d::ProcessGroupGloo::createDeviceForInterface(first);
  }
  if (master == "localhost" || master.rfind("127.", 0) == 0 || master == "::1") {
    return c10d::ProcessGroupGloo::createDeviceForHostname(master);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

}  // namespace

extern "C" {

void lc_dist_free_error(char* err) { std::free(err); }

// backend: "gloo" or "nccl". store_is_server: this process hosts the TCPStore (rank 0 unless
// torchrun's agent hosts it). device_index: the CUDA device of this rank (NCCL only).
void* lc_dist_init(const char* backend, const char* host, uint16_t port, int rank, int world,
                   int64_t timeout_ms, int store_is_server, int device_index, char** err) {
  Group* group = nullptr;
  int rc = guarded(err, [&] {
    // c10d logs every failed connect attempt with a stack trace; the caller reports the one
    // error that matters. TORCH_CPP_LOG_LEVEL=INFO|WARNING|ERROR brings c10's log back.
    if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
      FLAGS_caffe2_log_level = 3;  // FATAL only
    }
    const std::string name(backend);
    const std::string hostname(host);
    const std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = store_is_server != 0;
    so.numWorkers = static_cast<size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(hostname, so);
    auto store = c10::make_intrusive<c10d::PrefixStore>("loracast/default_pg", tcp);
    auto g = std::make_unique<Group>();
    g->store = tcp;
    g->timeout = timeout;
    if (name == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(gloo_device(hostname));
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    } else if (name == "nccl") {
#ifdef USE_C10D_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      (void)device_index;
      TORCH_CHECK(false, "this loracast was built without the `cuda` feature: no NCCL backend");
#endif
    } else {
      TORCH_CHECK(false, "unknown backend ", name, " (expected gloo or nccl)");
    }
    group = g.release();
  });
  return rc == 0 ? group : nullptr;
}

// Mean over ranks of every tensor of the list, in place, in one collective.
int lc_dist_allreduce_mean(void* handle, at::Tensor** tensors, size_t n, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    auto ts = gather(tensors, n);
    std::vector<at::Tensor> bufs{flatten(ts)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::AVG);
    opts.timeout = g->timeout;
    g->backend->allreduce(bufs, opts)->wait();
    unflatten(bufs[0], ts);
  });
}

// Rank `root`'s values of every tensor of the list, in place, in one collective.
int lc_dist_broadcast(void* handle, at::Tensor** tensors, size_t n, int root, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    auto ts = gather(tensors, n);
    std::vector<at::Tensor> bufs{flatten(ts)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    g->backend->broadcast(bufs, opts)->wait();
    unflatten(bufs[0], ts);
  });
}

int lc_dist_barrier(void* handle, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    g->backend->barrier(opts)->wait();
  });
}

// Destroys the group (after a clean run; a failed group is left to process exit).
int lc_dist_shutdown(void* handle, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    g->backend->shutdown();
    delete g;
  });
}

}  // extern "C"
