// Fused CPU kernel of GradientClipper modes "value" and "relative" (see gradclip_ros/clipping.py).
//
// One call walks the gradients twice and the weights once. Pass 1 sums the squares of each
// gradient in double precision. Pass 2 runs only when every gradient norm is finite: it clamps
// each element to [-t, t] in place, with t = max(low, rel * |w|) (mode "relative") or t = low
// (mode "value", no weights), counts the elements it changed and sums the squares of the result.
// A gradient at exactly t is left alone and not counted. When a norm is not finite nothing is
// written, so the gradients stay as they were for the caller's policy.
//
// Torch ops would need about eight passes over chunk-sized scratch copies for the same result;
// this loop needs one, and no copies. The caller loads it with torch.utils.cpp_extension.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
double sum_of_squares(const T* grad, int64_t count) {
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < count; ++i) {
    const double value = static_cast<double>(grad[i]);
    total += value * value;
  }
  return total;
}

// Clamp one gradient in place to [-t, t], t = max(low, rel * |w|). A NaN product (0 * inf from a
// huge rel, or a non-finite weight) gives t = low, as in the torch-op path.
template <typename T>
void clamp_relative(T* grad, const T* weight, int64_t count, T low, T rel, double* after_sq,
                    double* changed) {
  double squares = 0.0;
  int64_t moved = 0;
#pragma omp simd reduction(+ : squares, moved)
  for (int64_t i = 0; i < count; ++i) {
    const T value = grad[i];
    const T scaled = (weight[i] < T(0) ? -weight[i] : weight[i]) * rel;
    const T bound = scaled > low ? scaled : low;
    const T result = value > bound ? bound : (value < -bound ? -bound : value);
    moved += result != value;
    const double square = static_cast<double>(result);
    squares += square * square;
    grad[i] = result;
  }
  *after_sq = squares;
  *changed = static_cast<double>(moved);
}

// Clamp one gradient in place to [-bound, bound]. In mode value the bound is > 0 (inf when
// abs_tol exceeds the dtype's range).
template <typename T>
void clamp_value(T* grad, int64_t count, T bound, double* after_sq, double* changed) {
  double squares = 0.0;
  int64_t moved = 0;
#pragma omp simd reduction(+ : squares, moved)
  for (int64_t i = 0; i < count; ++i) {
    const T value = grad[i];
    const T result = std::min(std::max(value, -bound), bound);
    moved += result != value;
    const double square = static_cast<double>(result);
    squares += square * square;
    grad[i] = result;
  }
  *after_sq = squares;
  *changed = static_cast<double>(moved);
}

void check_inputs(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                  const std::vector<double>& low, const std::vector<double>& rel) {
  const size_t count = grads.size();
  TORCH_CHECK(low.size() == count, "clip_elementwise: ", count, " gradients but ", low.size(),
              " low bounds");
  TORCH_CHECK(weights.empty() || (weights.size() == count && rel.size() == count),
              "clip_elementwise: ", count, " gradients but ", weights.size(), " weights and ",
              rel.size(), " relative bounds");
  // Element order does not matter, so any dense layout works (channels-last included) as long
  // as a weight is laid out like its gradient.
  for (size_t i = 0; i < count; ++i) {
    const torch::Tensor& grad = grads[i];
    TORCH_CHECK(grad.device().is_cpu() && grad.layout() == torch::kStrided &&
                    grad.is_non_overlapping_and_dense() && !grad.is_neg(),
                "clip_elementwise: gradient ", i, " is not a dense CPU tensor");
    // Inference tensors cannot be written outside inference mode (their version counter
    // raises), and the torch ops reject them with torch's own message.
    TORCH_CHECK(!grad.is_inference(), "clip_elementwise: gradient ", i,
                " is an inference tensor");
    TORCH_CHECK(grad.scalar_type() == grads[0].scalar_type() &&
                    (grad.scalar_type() == torch::kFloat || grad.scalar_type() == torch::kDouble),
                "clip_elementwise: gradient ", i, " is ", grad.scalar_type(),
                "; the kernel takes float32 or float64, all alike");
    if (!weights.empty()) {
      const torch::Tensor& weight = weights[i];
      TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == grad.scalar_type() &&
                      weight.sizes() == grad.sizes() && weight.strides() == grad.strides(),
                  "clip_elementwise: weight ", i, " does not have the layout of its gradient");
    }
  }
}

template <typename T>
torch::Tensor run(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                  const std::vector<double>& low, const std::vector<double>& rel) {
  const int64_t count = static_cast<int64_t>(grads.size());
  std::vector<double> squares(count), after(count, 0.0), changed(count, 0.0);

  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      squares[i] = sum_of_squares(grads[i].data_ptr<T>(), grads[i].numel());
    }
  });

  // A norm whose square overflows the gradient dtype counts as non-finite, as it does when
  // torch computes the norm in that dtype.
  const double largest = static_cast<double>(std::numeric_limits<T>::max());
  auto result = torch::empty({count + 3}, torch::kDouble);
  double* out = result.data_ptr<double>();
  double total = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < count; ++i) {
    const double square = squares[i];
    out[i] = square > largest ? std::numeric_limits<double>::infinity() : std::sqrt(square);
    finite = finite && std::isfinite(out[i]);
    total += square;
  }

  if (finite) {
    // Writes go through raw pointers, so bump autograd's version counters as in-place ops do,
    // all before the first write.
    for (int64_t i = 0; i < count; ++i) {
      grads[i].unsafeGetTensorImpl()->bump_version();
    }
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* grad = grads[i].data_ptr<T>();
        const T bound = static_cast<T>(low[i]);
        if (weights.empty()) {
          clamp_value(grad, grads[i].numel(), bound, &after[i], &changed[i]);
        } else {
          clamp_relative(grad, weights[i].data_ptr<T>(), grads[i].numel(), bound,
                         static_cast<T>(rel[i]), &after[i], &changed[i]);
        }
      }
    });
  }
  double after_sq = 0.0;
  double moved = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    after_sq += after[i];
    moved += changed[i];
  }
  // The global norm is not finite whenever a gradient norm is not: NaN stays NaN.
  const double inf = std::numeric_limits<double>::infinity();
  out[count] = finite ? std::sqrt(total) : (std::isnan(total) ? total : inf);
  out[count + 1] = after_sq;
  out[count + 2] = moved;
  return result;
}

}  // namespace

// Returns float64 [P + 3]: the L2 norm of each gradient, the global norm, the sum of squares
// after clipping and the number of changed elements (both 0 when nothing was written).
torch::Tensor clip_elementwise(const std::vector<torch::Tensor>& grads,
                               const std::vector<torch::Tensor>& weights,
                               const std::vector<double>& low, const std::vector<double>& rel) {
  check_inputs(grads, weights, low, rel);
  if (!grads.empty() && grads[0].scalar_type() == torch::kDouble) {
    return run<double>(grads, weights, low, rel);
  }
  return run<float>(grads, weights, low, rel);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is released so that other Python threads (a ROS executor) run meanwhile.
  module.def("clip_elementwise", &clip_elementwise,
             "Clamp gradients element-wise in place and return norms and counts (float64)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
