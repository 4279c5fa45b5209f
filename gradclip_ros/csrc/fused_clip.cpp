// Fused CPU kernels of GradientClipper modes "value", "relative" and "unitwise" (see
// gradclip_ros/clipping.py).
//
// One call reads each gradient at most twice and each weight once. Pass 1 sums squares in double
// precision: per gradient, and for unitwise per unit (a slice along dim 0 of a tensor with 2 or
// more dims, else the whole tensor). Pass 2 runs only when every gradient norm is finite:
// - value and relative clamp each element to [-t, t] in place, with t = max(low, rel * |w|)
//   (relative) or t = low (value, no weights), and count the elements they changed. A gradient
//   at exactly t is left alone and not counted.
// - unitwise scales a unit by b / ||g_u|| when ||g_u|| > b = max(low, rel * max(||w_u||, eps)),
//   and counts the scaled units.
// All three sum the squares of the result. When a norm is not finite nothing is written, so the
// gradients stay as they were for the caller's policy.
//
// Torch ops need several passes over scratch copies for the same result (about eight for
// relative). These loops work on the tensors in place, with no copies. The caller loads them with
// torch.utils.cpp_extension.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
double sum_of_squares(const T* values, int64_t count) {
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < count; ++i) {
    const double value = static_cast<double>(values[i]);
    total += value * value;
  }
  return total;
}

// Clamp one gradient in place to [-t, t], t = max(low, rel * |w|). A NaN product (a NaN weight,
// or 0 * inf) gives t = low, as in the torch-op path.
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

// Returns the number of units: the size of dim 0 for 2 or more dims, else 1.
int64_t units_of(const torch::Tensor& tensor) {
  return tensor.dim() >= 2 ? tensor.size(0) : 1;
}

// Returns whether two tensors of one shape store their elements in the same order. The stride
// of a dimension of size 1 never matters, and torch sets it differently in different views.
bool same_layout(const torch::Tensor& first, const torch::Tensor& second) {
  if (first.sizes() != second.sizes()) {
    return false;
  }
  for (int64_t dim = 0; dim < first.dim(); ++dim) {
    if (first.size(dim) > 1 && first.stride(dim) != second.stride(dim)) {
      return false;
    }
  }
  return true;
}

void check_inputs(const char* function, const std::vector<torch::Tensor>& grads,
                  const std::vector<torch::Tensor>& weights, const std::vector<double>& low,
                  const std::vector<double>& rel, bool by_unit) {
  const size_t count = grads.size();
  TORCH_CHECK(low.size() == count, function, ": ", count, " gradients but ", low.size(),
              " low bounds");
  TORCH_CHECK(weights.empty() || (weights.size() == count && rel.size() == count), function,
              ": ", count, " gradients but ", weights.size(), " weights and ", rel.size(),
              " relative bounds");
  // Element order does not matter, so any dense layout works (channels-last included) as long
  // as a weight is laid out like its gradient. Units must still be contiguous blocks, which
  // holds when dim 0 is the outermost dimension.
  for (size_t i = 0; i < count; ++i) {
    const torch::Tensor& grad = grads[i];
    TORCH_CHECK(grad.device().is_cpu() && grad.layout() == torch::kStrided &&
                    grad.is_non_overlapping_and_dense() && !grad.is_neg(),
                function, ": gradient ", i, " is not a dense CPU tensor");
    // Inference tensors cannot be written outside inference mode (their version counter
    // raises), and the torch ops reject them with torch's own message.
    TORCH_CHECK(!grad.is_inference(), function, ": gradient ", i, " is an inference tensor");
    TORCH_CHECK(grad.scalar_type() == grads[0].scalar_type() &&
                    (grad.scalar_type() == torch::kFloat || grad.scalar_type() == torch::kDouble),
                function, ": gradient ", i, " is ", grad.scalar_type(),
                "; the kernel takes float32 or float64, all alike");
    if (by_unit && grad.dim() >= 2 && grad.size(0) > 1) {
      TORCH_CHECK(grad.stride(0) * grad.size(0) == grad.numel(), function, ": gradient ", i,
                  " does not keep dim 0 outermost, so its units are not contiguous");
    }
    if (!weights.empty()) {
      const torch::Tensor& weight = weights[i];
      TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == grad.scalar_type() &&
                      same_layout(weight, grad),
                  function, ": weight ", i, " does not have the layout of its gradient");
    }
  }
}

// Writes the L2 norm of each gradient into out[0..count) and returns whether all are finite.
// A norm whose square overflows the gradient dtype counts as non-finite, as it does when torch
// computes the norm in that dtype. out[count] becomes the global norm (not finite whenever a
// gradient norm is not; NaN stays NaN).
template <typename T>
bool write_norms(const std::vector<double>& squares, double* out) {
  const int64_t count = static_cast<int64_t>(squares.size());
  const double largest = static_cast<double>(std::numeric_limits<T>::max());
  const double inf = std::numeric_limits<double>::infinity();
  double total = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = squares[i] > largest ? inf : std::sqrt(squares[i]);
    finite = finite && std::isfinite(out[i]);
    total += squares[i];
  }
  out[count] = finite ? std::sqrt(total) : (std::isnan(total) ? total : inf);
  return finite;
}

// Writes the sums over all gradients of the squares after clipping and of the clipped
// elements or units into out[0] and out[1].
void write_totals(const std::vector<double>& after, const std::vector<double>& clipped,
                  double* out) {
  double after_sq = 0.0;
  double clipped_count = 0.0;
  for (size_t i = 0; i < after.size(); ++i) {
    after_sq += after[i];
    clipped_count += clipped[i];
  }
  out[0] = after_sq;
  out[1] = clipped_count;
}

// Writes go through raw pointers, so bump autograd's version counters as in-place ops do, all
// before the first write.
void bump_versions(const std::vector<torch::Tensor>& grads) {
  for (const torch::Tensor& grad : grads) {
    grad.unsafeGetTensorImpl()->bump_version();
  }
}

template <typename T>
torch::Tensor run_elementwise(const std::vector<torch::Tensor>& grads,
                              const std::vector<torch::Tensor>& weights,
                              const std::vector<double>& low, const std::vector<double>& rel) {
  const int64_t count = static_cast<int64_t>(grads.size());
  std::vector<double> squares(count), after(count, 0.0), changed(count, 0.0);

  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      squares[i] = sum_of_squares(grads[i].data_ptr<T>(), grads[i].numel());
    }
  });

  auto result = torch::empty({count + 3}, torch::kDouble);
  double* out = result.data_ptr<double>();
  if (write_norms<T>(squares, out)) {
    bump_versions(grads);
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

  write_totals(after, changed, out + count + 1);
  return result;
}

template <typename T>
torch::Tensor run_unitwise(const std::vector<torch::Tensor>& grads,
                           const std::vector<torch::Tensor>& weights,
                           const std::vector<double>& low, const std::vector<double>& rel,
                           double eps) {
  const int64_t count = static_cast<int64_t>(grads.size());
  std::vector<int64_t> first(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) {
    first[i + 1] = first[i] + units_of(grads[i]);
  }
  std::vector<double> grad_sq(first[count]), weight_sq(first[count]);
  std::vector<double> squares(count, 0.0), after(count, 0.0), scaled(count, 0.0);

  // Pass 1: squared norms of every gradient and weight unit.
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t units = first[i + 1] - first[i];
      const int64_t length = units == 0 ? 0 : grads[i].numel() / units;
      const T* grad = grads[i].data_ptr<T>();
      const T* weight = weights[i].data_ptr<T>();
      for (int64_t u = 0; u < units; ++u) {
        grad_sq[first[i] + u] = sum_of_squares(grad + u * length, length);
        weight_sq[first[i] + u] = sum_of_squares(weight + u * length, length);
        squares[i] += grad_sq[first[i] + u];
      }
    }
  });

  auto result = torch::empty({count + 3}, torch::kDouble);
  double* out = result.data_ptr<double>();
  if (write_norms<T>(squares, out)) {
    bump_versions(grads);
    // Pass 2: the bound per unit, in the gradient dtype as the torch ops compute it. A NaN
    // product (a NaN weight, or 0 * inf) gives the abs_tol bound, as in the torch-op path.
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t units = first[i + 1] - first[i];
        const int64_t length = units == 0 ? 0 : grads[i].numel() / units;
        const T floor = static_cast<T>(eps);
        const T scale_by = static_cast<T>(rel[i]);
        const T minimum = static_cast<T>(low[i]);
        T* grad = grads[i].data_ptr<T>();
        for (int64_t u = 0; u < units; ++u) {
          const T grad_norm = static_cast<T>(std::sqrt(grad_sq[first[i] + u]));
          const T weight_norm = static_cast<T>(std::sqrt(weight_sq[first[i] + u]));
          // A NaN weight norm stays NaN through the eps floor, as in torch.clamp_min.
          const T floored = (weight_norm != weight_norm || weight_norm > floor) ? weight_norm
                                                                                : floor;
          const T product = floored * scale_by;
          const T bound = product > minimum ? product : minimum;
          T norm_after = grad_norm;
          if (grad_norm > bound) {
            const T scale = bound / grad_norm;
            T* row = grad + u * length;
#pragma omp simd
            for (int64_t j = 0; j < length; ++j) {
              row[j] *= scale;
            }
            norm_after = grad_norm * scale;
            scaled[i] += 1.0;
          }
          after[i] += static_cast<double>(norm_after) * static_cast<double>(norm_after);
        }
      }
    });
  }

  write_totals(after, scaled, out + count + 1);
  return result;
}

}  // namespace

// Clamps gradients element-wise in place (modes value and relative). Returns float64 [P + 3]:
// the L2 norm of each gradient, the global norm, the sum of squares after clipping and the
// number of changed elements (both 0 when nothing was written).
torch::Tensor clip_elementwise(const std::vector<torch::Tensor>& grads,
                               const std::vector<torch::Tensor>& weights,
                               const std::vector<double>& low, const std::vector<double>& rel) {
  check_inputs("clip_elementwise", grads, weights, low, rel, false);
  if (!grads.empty() && grads[0].scalar_type() == torch::kDouble) {
    return run_elementwise<double>(grads, weights, low, rel);
  }
  return run_elementwise<float>(grads, weights, low, rel);
}

// Scales gradient units in place (mode unitwise). Returns float64 [P + 3] like
// clip_elementwise, with the number of scaled units last.
torch::Tensor clip_unitwise(const std::vector<torch::Tensor>& grads,
                            const std::vector<torch::Tensor>& weights,
                            const std::vector<double>& low, const std::vector<double>& rel,
                            double eps) {
  TORCH_CHECK(weights.size() == grads.size(), "clip_unitwise: ", grads.size(),
              " gradients but ", weights.size(), " weights");
  check_inputs("clip_unitwise", grads, weights, low, rel, true);
  if (!grads.empty() && grads[0].scalar_type() == torch::kDouble) {
    return run_unitwise<double>(grads, weights, low, rel, eps);
  }
  return run_unitwise<float>(grads, weights, low, rel, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is released so that other Python threads (a ROS executor) run meanwhile.
  module.def("clip_elementwise", &clip_elementwise,
             "Clamp gradients element-wise in place and return norms and counts (float64)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("clip_unitwise", &clip_unitwise,
             "Scale gradient units in place and return norms and counts (float64)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
