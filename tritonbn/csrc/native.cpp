// tritonbn's native call path (tritonbn/native.py builds and loads it; opt-in: tritonbn.native.enable()).
//
// A BatchNorm call on the Python path pays for Python at every level: the autograd.Function (~5 µs of
// torch's Python machinery on a fast core), the launchers, Triton's launcher (a data_ptr() call and a
// cuPointerGetAttribute per pointer), and in the backward a Python node on autograd's device thread.
// Here the autograd node is C++ and each launch is one cuLaunchKernel on a parameter buffer packed
// from a program that Python recorded once per plan: which tensor (a slot of the call's table) or
// scalar goes to each kernel parameter, in the compiled kernel's own parameter types. No Python runs in
// the backward unless a program is missing (then, and under create_graph, the Python backward runs).
//
// Slots of the forward table: x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
// counters, then the allocations (workspace, y, mask). Backward: x, dy, weight, bias, mean_src, var_src,
// mask, counters, then its allocations (sums, dx, dz, dweight, dbias). An undefined tensor in a slot
// (an absent optional argument) passes the launch's fallback slot instead: the kernel does not read it.

#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>

#include <dlfcn.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// SPECIALIZED: an integer Triton specialized into the kernel (equal to 1): not passed to the GPU, but
// handed to the launch hook, which launches through Triton with every argument.
enum ParamKind : int64_t { PTR = 0, I32 = 1, I64 = 2, U32 = 3, U64 = 4, F32 = 5, F64 = 6, SPECIALIZED = 7 };
enum ScalarSrc : int64_t { CONSTANT = -1, MOMENTUM = 0, EPS = 1 };

struct Param {
  int64_t kind;
  int64_t src;     // PTR: table slot; scalars: CONSTANT, MOMENTUM or EPS
  int64_t ivalue;  // integer constant
  double fvalue;   // floating-point constant
};

struct Launch {
  int64_t kernel_id;  // the Python launch it was recorded from (launch hook, errors)
  uint64_t function;  // CUfunction
  int64_t grid[3];
  int64_t threads;
  int64_t shared;
  int64_t fallback;   // slot passed where a pointer slot holds an undefined tensor
  std::vector<Param> params;
};

struct Alloc {
  int64_t slot;
  int64_t like;   // >= 0: empty_like(table[like]); -1: 1-D tensor of numel elements, dtype
  int64_t numel;
  int64_t dtype;  // c10::ScalarType
};

// An output: undefined (slot -1), table[slot], or table[slot][offset : offset + length] (1-D view).
struct Output {
  int64_t slot = -1;
  int64_t offset = 0;
  int64_t length = -1;
};

struct Program {
  std::vector<Alloc> allocs;
  std::vector<Launch> launches;
  std::vector<Output> outputs;
};

struct Plan {
  Program forward;               // outputs: y, saved statistics, saved mask
  bool training = false;         // what the node saves: the batch statistics, or the running ones
  // needs bitmask (dx 1, dweight 2, dbias 4, dz 8) -> program (outputs: dx, dweight, dbias, dz). Shared
  // pointers: a backward takes its program under the lock while the Python backward may add another.
  std::map<int64_t, std::shared_ptr<const Program>> backward;
};

std::mutex registry_mutex;
std::vector<std::unique_ptr<Plan>> registry;  // plans are never freed: saved graphs refer to them

py::object launch_hook;    // set: launches go to this Python callable (CPU tests, the interpreter)
py::object python_backward;  // the Python backward (missing programs, create_graph, unusual dy)

Plan& plan_at(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "tritonbn native: bad plan handle");
  return *registry[handle];
}

// The driver entry points, resolved once from libcuda (this extension links no CUDA library: it builds
// against CPU and CUDA builds of torch alike).
struct Driver {
  int (*launch)(uint64_t, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                void**);
  int (*ctx_get_current)(void**);
  int (*ctx_set_current)(void*);
  int (*device_get)(int*, int);
  int (*primary_ctx_retain)(void**, int);
};

template <typename F>
void resolve_symbol(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  TORCH_CHECK(fn != nullptr, "tritonbn native: libcuda.so.1 has no ", name);
}

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "tritonbn native: cannot load libcuda.so.1");
    Driver d{};
    resolve_symbol(lib, "cuLaunchKernel", d.launch);
    resolve_symbol(lib, "cuCtxGetCurrent", d.ctx_get_current);
    resolve_symbol(lib, "cuCtxSetCurrent", d.ctx_set_current);
    resolve_symbol(lib, "cuDeviceGet", d.device_get);
    resolve_symbol(lib, "cuDevicePrimaryCtxRetain", d.primary_ctx_retain);
    return d;
  }();
  return d;
}

using ErrorFn = int (*)(int, const char**);

std::string cu_error(int code) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  const char* text = nullptr;
  if (lib != nullptr) {
    auto f = reinterpret_cast<ErrorFn>(dlsym(lib, "cuGetErrorString"));
    if (f != nullptr) f(code, &text);
  }
  return text != nullptr ? std::string(text) : "CUDA error " + std::to_string(code);
}

const Tensor& resolve(const std::vector<Tensor>& table, const Launch& l, int64_t slot) {
  const Tensor& t = table[slot];
  return t.defined() ? t : table[l.fallback];
}

// The kernel's parameters, each in an 8-byte cell, as Triton's launcher passes them, then its global and
// profile scratch pointers (null: tritonbn's kernels use none; native.py checks).
void pack(const Launch& l, const std::vector<Tensor>& table, double momentum, double eps,
          std::vector<uint64_t>& cells) {
  size_t n = 0;
  for (const Param& p : l.params) n += p.kind != SPECIALIZED;
  cells.assign(n + 2, 0);
  size_t i = 0;
  for (const Param& p : l.params) {
    if (p.kind == SPECIALIZED) continue;
    void* cell = &cells[i++];
    double f = p.src == MOMENTUM ? momentum : p.src == EPS ? eps : p.fvalue;
    switch (p.kind) {
      case PTR: {
        uint64_t ptr = reinterpret_cast<uint64_t>(resolve(table, l, p.src).data_ptr());
        std::memcpy(cell, &ptr, 8);
        break;
      }
      case I32: { int32_t v = static_cast<int32_t>(p.ivalue); std::memcpy(cell, &v, 4); break; }
      case I64: { int64_t v = p.ivalue; std::memcpy(cell, &v, 8); break; }
      case U32: { uint32_t v = static_cast<uint32_t>(p.ivalue); std::memcpy(cell, &v, 4); break; }
      case U64: { uint64_t v = static_cast<uint64_t>(p.ivalue); std::memcpy(cell, &v, 8); break; }
      case F32: { float v = static_cast<float>(f); std::memcpy(cell, &v, 4); break; }
      case F64: { std::memcpy(cell, &f, 8); break; }
      default: TORCH_CHECK(false, "tritonbn native: bad parameter kind ", p.kind);
    }
  }
}

// cuLaunchKernel launches into the thread's current context. torch's runtime calls make the device's
// primary context current lazily, so a thread may not have one yet (autograd's device thread, whose
// cudaSetDevice is skipped for the device the runtime already reports): bind it, as Triton's launcher does.
void ensure_context(int64_t device) {
  const Driver& d = driver();
  void* ctx = nullptr;
  if (d.ctx_get_current(&ctx) == 0 && ctx != nullptr) return;
  int dev = 0;
  int rc = d.device_get(&dev, static_cast<int>(device));
  if (rc == 0) rc = d.primary_ctx_retain(&ctx, dev);
  if (rc == 0) rc = d.ctx_set_current(ctx);
  TORCH_CHECK(rc == 0, "tritonbn native: no CUDA context for device ", device, ": ", cu_error(rc));
}

void run_launch(const Launch& l, const std::vector<Tensor>& table, double momentum, double eps, void* stream) {
  if (launch_hook) {
    py::gil_scoped_acquire gil;
    py::list args;
    for (const Param& p : l.params) {
      double f = p.src == MOMENTUM ? momentum : p.src == EPS ? eps : p.fvalue;
      if (p.kind == PTR) args.append(resolve(table, l, p.src));
      else if (p.kind == F32 || p.kind == F64) args.append(f);
      else args.append(p.ivalue);
    }
    launch_hook(l.kernel_id, args);
    return;
  }
  std::vector<uint64_t> cells;
  pack(l, table, momentum, eps, cells);
  std::vector<void*> params(cells.size());
  for (size_t i = 0; i < cells.size(); ++i) params[i] = &cells[i];
  int rc = driver().launch(l.function, l.grid[0], l.grid[1], l.grid[2], l.threads, 1, 1, l.shared, stream,
                       params.data(), nullptr);
  TORCH_CHECK(rc == 0, "tritonbn native: cuLaunchKernel of launch ", l.kernel_id, " failed: ", cu_error(rc));
}

// stream: the raw CUDA stream of the call (Python passes the current one; a backward reuses its forward's,
// which is the stream autograd runs the node on).
void run_program(const Program& prog, std::vector<Tensor>& table, double momentum, double eps, int64_t stream) {
  const Tensor& x = table[0];
  for (const Alloc& a : prog.allocs) {
    table[a.slot] = a.like >= 0 ? at::empty_like(table[a.like])
                                : at::empty({a.numel}, x.options().dtype(static_cast<c10::ScalarType>(a.dtype)));
  }
  if (!launch_hook) ensure_context(x.get_device());
  for (const Launch& l : prog.launches) run_launch(l, table, momentum, eps, reinterpret_cast<void*>(stream));
}

Tensor output(const std::vector<Tensor>& table, const Output& o) {
  if (o.slot < 0) return Tensor();
  const Tensor& t = table[o.slot];
  return o.length < 0 ? t : t.narrow(0, o.offset, o.length);
}

constexpr int64_t FORWARD_SLOTS = 11, BACKWARD_SLOTS = 13;

struct BatchNormNative : public torch::autograd::Function<BatchNormNative> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& residual, int64_t handle,
                        const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                        const std::optional<Tensor>& num_batches, const Tensor& counters, double momentum,
                        double eps, int64_t stream) {
    Plan& plan = plan_at(handle);
    std::vector<Tensor> table(FORWARD_SLOTS);
    table[0] = x;
    table[1] = weight.value_or(Tensor());
    table[2] = bias.value_or(Tensor());
    table[3] = residual.value_or(Tensor());
    table[4] = running_mean.value_or(Tensor());
    table[5] = running_var.value_or(Tensor());
    table[6] = num_batches.value_or(Tensor());
    table[7] = counters;
    run_program(plan.forward, table, momentum, eps, stream);
    Tensor y = output(table, plan.forward.outputs[0]);
    if (ctx != nullptr) {
      Tensor stats = output(table, plan.forward.outputs[1]);
      Tensor mask = output(table, plan.forward.outputs[2]);
      // Exactly the tensors BatchNormFunction (the Python path) saves, in its order: a plan's first call
      // takes that path, and a non-reentrant checkpoint compares what its recomputation saves with what
      // the original forward saved, tensor by tensor. The counters (a long-lived buffer of the stream) are
      // kept outside the saved tensors.
      if (plan.training) {
        ctx->save_for_backward({x, table[1], table[2], stats, stats, mask});
      } else {
        ctx->save_for_backward({x, table[1], table[2], table[4], table[5], mask});
      }
      ctx->saved_data["counters"] = counters;
      ctx->saved_data["handle"] = handle;
      ctx->saved_data["eps"] = eps;
      ctx->saved_data["stream"] = stream;
      // needs_input_grad counts only the inputs that are tensors: which of these were given.
      ctx->saved_data["given"] = static_cast<int64_t>((table[1].defined() ? 1 : 0) | (table[2].defined() ? 2 : 0) |
                                                      (table[3].defined() ? 4 : 0));
    }
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    int64_t handle = ctx->saved_data["handle"].toInt();
    double eps = ctx->saved_data["eps"].toDouble();
    int64_t stream = ctx->saved_data["stream"].toInt();
    Plan& plan = plan_at(handle);
    const Tensor& x = saved[0];
    Tensor dy = grads[0];
    int64_t given = ctx->saved_data["given"].toInt();
    int64_t needs = ctx->needs_input_grad(0) ? 1 : 0;
    size_t edge = 1;
    for (int64_t bit = 1; bit <= 4; bit <<= 1) {   // weight, bias, residual: edges only where given
      if ((given & bit) && ctx->needs_input_grad(edge++)) needs |= bit << 1;
    }
    std::shared_ptr<const Program> program;
    {
      std::lock_guard<std::mutex> lock(registry_mutex);
      auto found = plan.backward.find(needs);
      if (found != plan.backward.end()) program = found->second;
    }
    // A vmapped (is_grads_batched) or efficient-zero gradient has no memory to launch on: Python decides.
    bool native = program && !torch::autograd::GradMode::is_enabled() && dy.defined() && dy.has_storage() &&
                  !dy._is_zerotensor() && dy.strides() == x.strides() &&
                  reinterpret_cast<uintptr_t>(dy.data_ptr()) % 16 == 0;
    Tensor dx, dw, db, dz;
    if (native) {
      std::vector<Tensor> table(BACKWARD_SLOTS);
      table[0] = x;
      table[1] = dy;
      for (int i = 2; i < 7; ++i) table[i] = saved[i - 1];
      table[7] = ctx->saved_data["counters"].toTensor();
      run_program(*program, table, 0.0, eps, stream);
      dx = output(table, program->outputs[0]);
      dw = output(table, program->outputs[1]);
      db = output(table, program->outputs[2]);
      dz = output(table, program->outputs[3]);
    } else {
      py::gil_scoped_acquire gil;
      py::list py_saved;
      for (const Tensor& t : saved) py_saved.append(t.defined() ? py::cast(t) : py::none());
      py::tuple out = python_backward(handle, dy, py_saved, needs, eps).cast<py::tuple>();
      auto get = [&](int i) { return out[i].is_none() ? Tensor() : out[i].cast<Tensor>(); };
      dx = get(0);
      dw = get(1);
      db = get(2);
      dz = get(3);
    }
    // One per forward argument: x, weight, bias, residual, then the non-differentiable ones.
    return {dx, dw, db, dz, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor apply(int64_t handle, const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
             const std::optional<Tensor>& residual, const std::optional<Tensor>& running_mean,
             const std::optional<Tensor>& running_var, const std::optional<Tensor>& num_batches,
             const Tensor& counters, double momentum, double eps, int64_t stream, bool record) {
  if (!record) {
    return BatchNormNative::forward(nullptr, x, weight, bias, residual, handle, running_mean, running_var,
                                    num_batches, counters, momentum, eps, stream);
  }
  return BatchNormNative::apply(x, weight, bias, residual, handle, running_mean, running_var, num_batches,
                                counters, momentum, eps, stream);
}

Launch make_launch(int64_t kernel_id, uint64_t function, std::vector<int64_t> grid, int64_t threads, int64_t shared,
                   int64_t fallback, const std::vector<std::tuple<int64_t, int64_t, int64_t, double>>& params) {
  TORCH_CHECK(grid.size() == 3, "tritonbn native: grid needs 3 dimensions");
  Launch l{kernel_id, function, {grid[0], grid[1], grid[2]}, threads, shared, fallback, {}};
  for (const auto& [kind, src, ivalue, fvalue] : params) l.params.push_back(Param{kind, src, ivalue, fvalue});
  return l;
}

Program make_program(const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>& allocs,
                     const std::vector<Launch>& launches,
                     const std::vector<std::tuple<int64_t, int64_t, int64_t>>& outputs) {
  Program p;
  for (const auto& [slot, like, numel, dtype] : allocs) p.allocs.push_back(Alloc{slot, like, numel, dtype});
  p.launches = launches;
  for (const auto& [slot, offset, length] : outputs) p.outputs.push_back(Output{slot, offset, length});
  return p;
}

int64_t make_plan(const Program& forward, bool training) {
  TORCH_CHECK(forward.outputs.size() == 3, "tritonbn native: a forward program has 3 outputs");
  auto plan = std::make_unique<Plan>();
  plan->forward = forward;
  plan->training = training;
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(std::move(plan));
  return static_cast<int64_t>(registry.size()) - 1;
}

void set_backward(int64_t handle, int64_t needs, const Program& program) {
  TORCH_CHECK(program.outputs.size() == 4, "tritonbn native: a backward program has 4 outputs");
  Plan& plan = plan_at(handle);
  auto shared = std::make_shared<const Program>(program);
  std::lock_guard<std::mutex> lock(registry_mutex);
  plan.backward[needs] = std::move(shared);
}

bool has_backward(int64_t handle, int64_t needs) {
  Plan& plan = plan_at(handle);
  std::lock_guard<std::mutex> lock(registry_mutex);
  return plan.backward.count(needs) > 0;
}

// The packed parameter cells of a launch (tests compare them with Python's struct packing).
py::bytes packed(const Launch& l, const std::vector<std::optional<Tensor>>& table, double momentum, double eps) {
  std::vector<Tensor> t;
  for (const auto& o : table) t.push_back(o.value_or(Tensor()));
  std::vector<uint64_t> cells;
  pack(l, t, momentum, eps, cells);
  return py::bytes(reinterpret_cast<const char*>(cells.data()), cells.size() * 8);
}

void set_hooks(py::object hook, py::object backward) {
  launch_hook = hook.is_none() ? py::object() : hook;
  python_backward = backward;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Launch>(m, "Launch");
  py::class_<Program>(m, "Program");
  m.def("make_launch", &make_launch);
  m.def("make_program", &make_program);
  m.def("make_plan", &make_plan);
  m.def("set_backward", &set_backward);
  m.def("has_backward", &has_backward);
  m.def("set_hooks", &set_hooks);
  m.def("packed", &packed);
  m.def("apply", &apply);
  m.attr("FORWARD_SLOTS") = FORWARD_SLOTS;
  m.attr("BACKWARD_SLOTS") = BACKWARD_SLOTS;
  // Drop the Python callables before the interpreter finalizes (they hold Python objects).
  m.add_object("_cleanup", py::capsule([]() {
    launch_hook = py::object();
    python_backward = py::object();
  }));
}
