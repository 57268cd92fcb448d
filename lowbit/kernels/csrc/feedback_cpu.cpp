// lowbit column-feedback kernel for the CPU: GPTQ's (and FOEM's) inner loop over the columns of one lazy
// block on a uniform integer grid, the same float32 operations in the same order as the PyTorch engine
// (lowbit/solvers/feedback.py column_feedback with lowbit/solvers/gptq.py's quantize callback), so the result
// is bit-identical (built with -ffp-contract=off: no multiply-add is fused).
//
// Working copy Wt (n, m): row j is column j of W (in the engine's, possibly act-order permuted, order).
// For each position j in [c0, c1) (inside the lazy block [b0, b1)), every row i of W independently:
//   pull-back (FOEM, j > 0, j >= pull_start):  w <- w - beta * (w - w0)   (the caller may have pulled back c0)
//   q  = (clamp(round(w / s) + z, 0, maxq) - z) * s        s, z: scales/zeros[i, group_of[j]]
//   d  = w - q;   FOEM:  d <- d - beta * (w - w0)
//   e  = d / U[j, j];   Wt[j] = q;   E[j - b0] = e
//   Wt[k] -= U[j, k] * e   for k in (j, b1)                (the in-block rank-1 update)
// Rows of W never interact, so the rows are split over OpenMP threads (each thread runs every column for its
// rows).  round() is round-half-to-even (std::nearbyint in the default rounding mode), as torch.round.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>

namespace {

void uniform_columns(torch::Tensor Wt, torch::Tensor W0t, torch::Tensor U, torch::Tensor scales,
                     torch::Tensor zeros, torch::Tensor group_of, torch::Tensor E, int64_t b0, int64_t b1,
                     int64_t c0, int64_t c1, double maxq_d, double beta_d, int64_t pull_start) {
  TORCH_CHECK(Wt.dtype() == torch::kFloat32 && Wt.is_contiguous() && Wt.dim() == 2, "Wt: contiguous float32 (n, m)");
  TORCH_CHECK(E.dtype() == torch::kFloat32 && E.is_contiguous() && E.size(1) == Wt.size(1), "E: contiguous float32 (B, m)");
  TORCH_CHECK(U.dtype() == torch::kFloat32 && scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32,
              "U, scales, zeros: float32");
  TORCH_CHECK(group_of.dtype() == torch::kInt64 && group_of.is_contiguous(), "group_of: contiguous int64");
  const bool foem = beta_d != 0.0;
  TORCH_CHECK(!foem || (W0t.dtype() == torch::kFloat32 && W0t.is_contiguous() && W0t.sizes() == Wt.sizes()),
              "W0t: contiguous float32 like Wt");
  const int64_t m = Wt.size(1);
  TORCH_CHECK(0 <= b0 && b0 <= c0 && c0 <= c1 && c1 <= b1 && b1 <= Wt.size(0) && E.size(0) >= b1 - b0,
              "bad block range");
  float* w = Wt.data_ptr<float>();
  const float* w0 = foem ? W0t.data_ptr<float>() : nullptr;
  float* e_out = E.data_ptr<float>();
  const float* u = U.data_ptr<float>();
  const int64_t us0 = U.stride(0), us1 = U.stride(1);
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  const int64_t ss0 = scales.stride(0), ss1 = scales.stride(1), zs0 = zeros.stride(0), zs1 = zeros.stride(1);
  const int64_t* gp = group_of.data_ptr<int64_t>();
  const float maxq = static_cast<float>(maxq_d), beta = static_cast<float>(beta_d);

  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t j = c0; j < c1; ++j) {
      float* wj = w + j * m;
      float* ej = e_out + (j - b0) * m;
      const int64_t g = gp[j];
      const float ujj = u[j * us0 + j * us1];
      if (foem && j > 0 && j >= pull_start) {
        const float* w0j = w0 + j * m;
        for (int64_t i = r0; i < r1; ++i) wj[i] = wj[i] - beta * (wj[i] - w0j[i]);
      }
      for (int64_t i = r0; i < r1; ++i) {
        const float s = sp[i * ss0 + g * ss1], z = zp[i * zs0 + g * zs1];
        float q = std::nearbyint(wj[i] / s) + z;
        q = std::min(std::max(q, 0.0f), maxq);
        q = (q - z) * s;
        float d = wj[i] - q;
        if (foem) d = d - beta * (wj[i] - w0[j * m + i]);
        ej[i] = d / ujj;
        wj[i] = q;
      }
      for (int64_t k = j + 1; k < b1; ++k) {
        const float ujk = u[j * us0 + k * us1];
        float* wk = w + k * m;
        for (int64_t i = r0; i < r1; ++i) wk[i] = wk[i] - ujk * ej[i];
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform_columns", &uniform_columns,
        "GPTQ/FOEM column feedback on a uniform grid over columns [c0, c1) of the lazy block [b0, b1), in place");
}
